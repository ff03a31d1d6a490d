"""K-wise rankings -> validated, tokenized, padded numpy arrays (numpy only, no jax).

jaxrm/ranking_formats.py loads the rankings (load_rankings). Every kept response of every kept
prompt is one row of `ids`: tokenizer.encode(prompt + response), right-padded with pad_id to
seq_len; a prompt's rows are consecutive (`offsets`), in the file's order, each with its rank
(1 = best, equal = a tie). The checks, truncation and lengths settings are those of pairs
(jaxrm/data.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxrm.config import RunConfig
from jaxrm.data import check_encoding, check_sequence, check_unicode, fit_sequences, run_encoding
from jaxrm.formats import Columns, DataError, pair_location
from jaxrm.ranking_formats import Ranking, dense_ranks, load_rankings


@dataclass(frozen=True)
class EncodedRankings:
    ids: np.ndarray  # (M, T) int32: every kept response of every kept prompt, right-padded with pad_id
    lengths: np.ndarray  # (M,) int32: real tokens of each row
    ranks: np.ndarray  # (M,) int32: each row's rank within its prompt (dense, 1 = best)
    offsets: np.ndarray  # (N + 1,) int64: prompt i's rows are ids[offsets[i]:offsets[i + 1]]
    source_index: np.ndarray  # (N,) int64: each kept prompt's index in the list encode_rankings got

    def __len__(self) -> int:
        """N, the number of prompts."""
        return len(self.offsets) - 1

    def longest(self) -> np.ndarray:
        """(N,) int32: the longest row of each prompt."""
        return np.maximum.reduceat(self.lengths, self.offsets[:-1])

    def group_sizes(self) -> np.ndarray:
        """(N,) int64: K_i, the number of rows of each prompt."""
        return np.diff(self.offsets)

    def arrays(self) -> tuple[np.ndarray, ...]:
        """The encoded content (jaxrm.dataid hashes it)."""
        return self.ids, self.lengths, self.ranks, self.offsets

    def batch(self, idx: np.ndarray) -> dict:
        """Prompts `idx` as a ranking batch (jaxrm/ranking_step.py): input_ids (M, T) their rows,
        lengths (M,), ranks (M,), offsets (len(idx) + 1,)."""
        sizes = self.group_sizes()[idx]
        rows = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in idx])  # (M,)
        return {
            "input_ids": self.ids[rows],  # (M, T)
            "lengths": self.lengths[rows],
            "ranks": self.ranks[rows],
            "offsets": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        }


def encode_rankings(
    rankings: list[Ranking],
    tokenizer,
    *,
    seq_len: int,
    pad_id: int,
    vocab_size: int,
    truncation: str = "drop",
    source: str = "<rankings>",
    lengths: str = "first_pad",
) -> tuple[EncodedRankings, dict]:
    """Tokenize, check and pad rankings; (EncodedRankings, stats).

    Each response is checked as a pair's sequence is (jaxrm/data.py: zero tokens, an id outside
    vocab_size, PAD inside the text unless lengths="explicit", invalid Unicode); errors name
    `source:line (ranking i)` and the response. Per prompt, in this order:
    - a response whose ids equal an earlier kept one's is dropped, keeping the better-ranked of the
      two (the first on a tie); ranks are then made dense again (dropped_duplicate_responses);
    - a prompt left with < 2 responses, or with all of them tied, holds no preference: dropped
      (dropped_no_preference);
    - a prompt with a response longer than seq_len: truncation="drop" drops the prompt
      (dropped_too_long), "error" raises, "left" cuts the same number of tokens from the left of
      every response when that keeps at least one token of their common prefix, else drops it.
    Stats: rankings_in, rankings_kept, responses_kept, ordered_pairs (pairs of different rank in
    the kept prompts), the dropped_* counts (and truncated_left with "left"), max_len, max_k.
    A DataError when no prompt is left."""
    check_encoding(
        truncation=truncation, lengths=lengths, seq_len=seq_len, pad_id=pad_id, vocab_size=vocab_size
    )
    stats = _fresh_stats(len(rankings), truncation)
    checks = dict(pad_id=pad_id, vocab_size=vocab_size, lengths=lengths)
    kept, kept_index = [], []  # ([ids of each response], (rank of each)); its index in `rankings`
    for i, ranking in enumerate(rankings):
        where = pair_location(source, i, ranking, with_index=True, item="ranking")
        encoded = _encoded(ranking, tokenizer, where, seq_len, truncation, stats, checks)
        if encoded is not None:
            kept.append(encoded)
            kept_index.append(i)
    if not kept:
        raise DataError(f"{source}: no rankings left after filtering ({stats})")
    data = _padded(kept, kept_index, seq_len, pad_id)
    stats.update(
        rankings_kept=len(kept),
        responses_kept=len(data.lengths),
        ordered_pairs=sum(_ordered_pairs(ranks) for _, ranks in kept),
        max_len=int(data.lengths.max()),
        max_k=int(data.group_sizes().max()),
    )
    return data, stats


def _fresh_stats(rankings: int, truncation: str) -> dict:
    stats = {
        "rankings_in": rankings,
        "rankings_kept": 0,
        "responses_kept": 0,
        "ordered_pairs": 0,
        "dropped_duplicate_responses": 0,
        "dropped_no_preference": 0,
        "dropped_too_long": 0,
        "max_len": 0,
        "max_k": 0,
    }
    if truncation == "left":
        stats["truncated_left"] = 0
    return stats


def _encoded(ranking: Ranking, tokenizer, where: str, seq_len: int, truncation: str, stats: dict, checks):
    """(the kept responses' ids, their ranks) of one ranking, or None when it is dropped
    (encode_rankings' rules, counted in `stats`)."""
    seqs = _checked_responses(ranking, tokenizer, where, **checks)
    seqs, ranks = _distinct(seqs, ranking.ranks, stats)
    if len(seqs) < 2 or len(set(ranks)) < 2:
        stats["dropped_no_preference"] += 1
        return None
    fitted = fit_sequences(seqs, seq_len, truncation, where, stats)
    return None if fitted is None else (fitted, ranks)


def _checked_responses(ranking: Ranking, tokenizer, where: str, **checks) -> list[list[int]]:
    """encode(prompt + response) of each response, each checked (check_sequence; `checks`: pad_id,
    vocab_size, lengths)."""
    seqs = []
    for j, response in enumerate(ranking.responses):
        check_unicode(ranking.prompt + response, f"{where}: response {j}")
        ids = tokenizer.encode(ranking.prompt + response)
        check_sequence(ids, f"response {j}", where, **checks)
        seqs.append(ids)
    return seqs


def _distinct(seqs: list[list[int]], ranks, stats: dict) -> tuple[list[list[int]], tuple[int, ...]]:
    """The sequences without repeats (the better-ranked copy kept, the first on a tie), in their
    order, with dense ranks; counts the dropped in stats["dropped_duplicate_responses"]."""
    best = {}  # ids -> index of the copy to keep
    for j, ids in enumerate(seqs):
        key = tuple(ids)
        if key not in best or ranks[j] < ranks[best[key]]:
            best[key] = j
    keep = sorted(best.values())
    stats["dropped_duplicate_responses"] += len(seqs) - len(keep)
    return [seqs[j] for j in keep], dense_ranks([ranks[j] for j in keep])


def _ordered_pairs(ranks) -> int:
    """How many pairs of responses have different ranks."""
    return sum(a < b for a in ranks for b in ranks)


def _padded(kept: list, kept_index: list[int], seq_len: int, pad_id: int) -> EncodedRankings:
    """[([ids of each response], ranks)] -> EncodedRankings right-padded with pad_id to seq_len."""
    rows = [ids for seqs, _ in kept for ids in seqs]
    padded = np.full((len(rows), seq_len), pad_id, dtype=np.int32)  # (M, T)
    for m, ids in enumerate(rows):
        padded[m, : len(ids)] = ids
    sizes = [len(seqs) for seqs, _ in kept]
    return EncodedRankings(
        ids=padded,
        lengths=np.array([len(ids) for ids in rows], dtype=np.int32),  # (M,)
        ranks=np.array([r for _, ranks in kept for r in ranks], dtype=np.int32),  # (M,)
        offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),  # (N + 1,)
        source_index=np.array(kept_index, dtype=np.int64),  # (N,)
    )


def load_ranking_split(run: RunConfig, tokenizer, path: str, source: str) -> tuple[EncodedRankings, dict]:
    """The rankings of one file (or datasets DIR[:SPLIT]) for `run`: read with its column names,
    tokenized and padded to its seq_len (default block_size) with its PAD, truncation and lengths;
    (EncodedRankings, stats)."""
    rankings = load_rankings(path, Columns.from_train_config(run.train))
    return encode_rankings(rankings, tokenizer, source=source, **run_encoding(run))
