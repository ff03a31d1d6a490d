"""Preference pairs -> validated, tokenized, padded numpy batches (numpy only, no jax).

jaxrm/formats.py loads the pairs (load_pairs) from JSON Lines (plain or .gz), JSON, CSV, Parquet,
saved HF datasets directories; e.g. one pair per line:
    {"prompt": "...", "chosen": "...", "rejected": "...", "margin": 1.5}
"prompt" and "margin" are optional. A sequence is tokenizer.encode(prompt + answer),
right-padded with pad_id to seq_len. Batches use the original's layout: input_ids [2B, T] with
rows 0..B-1 the chosen answers and rows B..2B-1 the rejected answers of the same pairs.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from jaxrm.config import LENGTHS, TRUNCATIONS, RunConfig  # TrainConfig.lengths, TrainConfig.truncation
from jaxrm.formats import (
    Columns,
    DataError,
    PreferencePair,
    is_float32,
    pair_location,
    shared_prefix_len,
)
from jaxrm.ranking_formats import load_pairs_or_rankings, ranking_pairs
from jaxrm.tokenizer import first_out_of_range

SPLITS = ("train", "validation", "test")
BUNDLED_DIR = pathlib.Path(__file__).resolve().parent / "assets" / "vader_pairs"


def bundled_data_path(split: str) -> pathlib.Path:
    """The bundled VADER preference pairs (see jaxrm/assets/README.md)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid choices: {', '.join(SPLITS)}")
    return BUNDLED_DIR / f"{split}.jsonl.gz"


# -----------------------------------------------------------------------------
# tokenizing


@dataclass(frozen=True)
class EncodedPairs:
    chosen_ids: np.ndarray  # (N, T) int32, right-padded with pad_id
    rejected_ids: np.ndarray  # (N, T) int32
    chosen_lengths: np.ndarray  # (N,) int32, number of real tokens
    rejected_lengths: np.ndarray  # (N,) int32
    margins: np.ndarray  # (N,) float32, 0 where absent
    source_index: np.ndarray | None = None  # (N,) int64: each pair's index in the list encode_pairs got

    def __len__(self):
        return self.chosen_ids.shape[0]

    def longest(self) -> np.ndarray:
        """(N,) the longer side of each pair."""
        return np.maximum(self.chosen_lengths, self.rejected_lengths)

    def arrays(self) -> tuple[np.ndarray, ...]:
        """The encoded content (jaxrm.dataid hashes it)."""
        return self.chosen_ids, self.rejected_ids, self.chosen_lengths, self.rejected_lengths, self.margins

    def batch(self, idx: np.ndarray) -> dict:
        """Pairs `idx` in the original's layout: input_ids (2B, T) chosen rows then rejected rows,
        lengths (2B,), margins (B,)."""
        return {
            "input_ids": np.concatenate([self.chosen_ids[idx], self.rejected_ids[idx]]),  # (2B, T)
            "lengths": np.concatenate([self.chosen_lengths[idx], self.rejected_lengths[idx]]),  # (2B,)
            "margins": self.margins[idx],  # (B,)
        }


def pair_ids(pair: PreferencePair, tokenizer) -> tuple[list[int], list[int]]:
    """(chosen ids, rejected ids): the pair's pre-tokenized ids, else encode(prompt + answer)."""
    if pair.chosen_ids is not None:
        return list(pair.chosen_ids), list(pair.rejected_ids)
    return tokenizer.encode(pair.prompt + pair.chosen), tokenizer.encode(pair.prompt + pair.rejected)


def encode_pairs(
    pairs,
    tokenizer,
    *,
    seq_len: int,
    pad_id: int,
    vocab_size: int,
    truncation: str = "drop",
    source: str = "<pairs>",
    lengths: str = "first_pad",
) -> tuple[EncodedPairs, dict]:
    """Tokenize, check and pad pairs. Pairs longer than seq_len: truncation="drop" skips them,
    "error" raises, "left" cuts tokens from the left of the shared prefix (the prompt) of both
    sequences, keeping the answers and at least one shared token; a pair whose answers alone do not
    fit is dropped. No truncation ever makes a pair identical (identical pairs are dropped).

    lengths="first_pad" (the original): the first PAD ends a sequence, so a PAD id inside a text
    is an error. lengths="explicit": the batches' "lengths" end the sequences (TrainConfig.lengths),
    so a PAD / end-of-text id inside a text is ordinary data. chosen_lengths / rejected_lengths are
    the true lengths either way."""
    check_encoding(
        truncation=truncation, lengths=lengths, seq_len=seq_len, pad_id=pad_id, vocab_size=vocab_size
    )
    stats = {
        "pairs_in": len(pairs),
        "pairs_kept": 0,
        "dropped_too_long": 0,
        "dropped_identical": 0,
        "max_len": 0,
        "with_margin": 0,  # kept pairs that have a margin
    }
    if truncation == "left":
        stats["truncated_left"] = 0
    kept, kept_index = [], []  # (chosen ids, rejected ids, margin); its index in `pairs`
    for i, p in enumerate(pairs):
        where = pair_location(source, i, p, with_index=True)
        c, r = _checked_ids(p, tokenizer, where, pad_id=pad_id, vocab_size=vocab_size, lengths=lengths)
        fitted = _fit(c, r, seq_len, truncation, where, stats)
        if fitted is not None:
            kept.append((*fitted, 0.0 if p.margin is None else p.margin))
            kept_index.append(i)
            stats["with_margin"] += p.margin is not None
    if not kept:
        raise DataError(f"{source}: no pairs left after filtering ({stats})")
    data = dataclasses.replace(_padded(kept, seq_len, pad_id), source_index=np.array(kept_index, np.int64))
    stats["pairs_kept"] = len(kept)
    stats["max_len"] = int(max(data.chosen_lengths.max(), data.rejected_lengths.max()))
    return data, stats


def check_encoding(*, truncation: str, lengths: str, seq_len: int, pad_id: int, vocab_size: int) -> None:
    """A ValueError for settings that cannot work (an unknown policy, pad_id outside the vocabulary)."""
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    if lengths not in LENGTHS:
        raise ValueError(f"lengths must be one of {LENGTHS}, got {lengths!r}")
    if seq_len < 1 or not 0 <= pad_id < vocab_size:
        raise ValueError(
            f"need seq_len >= 1 and 0 <= pad_id < vocab_size, got {seq_len=}, {pad_id=}, {vocab_size=}"
        )


def _checked_ids(
    p: PreferencePair, tokenizer, where: str, *, pad_id: int, vocab_size: int, lengths: str
) -> tuple[list[int], list[int]]:
    """pair_ids(p), after the checks that refuse the pair (a DataError naming `where`)."""
    if p.chosen_ids is None:
        check_unicode(p.prompt + p.chosen + p.rejected, where)
    c, r = pair_ids(p, tokenizer)
    for side, ids in (("chosen", c), ("rejected", r)):
        check_sequence(ids, side, where, pad_id=pad_id, vocab_size=vocab_size, lengths=lengths)
    if p.margin is not None and not is_float32(p.margin):  # NaN, inf, float32 overflow
        raise DataError(f"{where}: margin {p.margin} is not a finite float32")
    return c, r


def check_unicode(text: str, where: str) -> None:
    """A lone surrogate ("\\ud800" in JSON) is not text: never encode it (or replace it) silently."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: text is not valid Unicode ({e.reason})") from None


def check_sequence(ids: list[int], what: str, where: str, *, pad_id: int, vocab_size: int, lengths: str):
    """Refuse one encoded sequence (prompt + `what`, e.g. "chosen" / "response 2") that has no
    token, an id outside the model's vocabulary, or (lengths="first_pad") a PAD inside the text;
    the DataError names `where` and `what`."""
    if not ids:
        raise DataError(f"{where}: prompt + {what} encodes to zero tokens")
    bad = first_out_of_range(ids, vocab_size)
    if bad is not None:
        raise DataError(
            f"{where}: {what} has token id {bad[-1]} outside [0, {vocab_size}): "
            f"the tokenizer's vocabulary is larger than the model's"
        )
    if pad_id in ids and lengths == "first_pad":
        raise DataError(
            f"{where}: {what} contains the pad id {pad_id} at token "
            f"{ids.index(pad_id)} inside the real text (would end the sequence early; "
            f"--lengths=explicit keeps it as text)"
        )


def _fit(c: list[int], r: list[int], seq_len: int, truncation: str, where: str, stats: dict):
    """(c, r) within seq_len (fit_sequences), or None for a dropped pair (identical, or too long);
    counts what it does in `stats`."""
    if c == r:
        stats["dropped_identical"] += 1
        return None
    return fit_sequences([c, r], seq_len, truncation, where, stats)


def fit_sequences(seqs: list[list[int]], seq_len: int, truncation: str, where: str, stats: dict):
    """K distinct sequences within seq_len, or None when they do not fit (counted in
    stats["dropped_too_long"]; truncation="error" raises). truncation="left" cuts the same number
    of tokens from the left of every sequence when that leaves at least one token of their common
    prefix (the prompt), counted in stats["truncated_left"]; distinct sequences stay distinct."""
    cut = max(map(len, seqs)) - seq_len
    if cut > 0 and truncation == "left" and cut < shared_prefix_len(seqs):
        seqs = [s[cut:] for s in seqs]
        stats["truncated_left"] += 1
    longest = max(map(len, seqs))
    if longest > seq_len:
        if truncation == "error":
            raise DataError(f"{where}: {longest} tokens > seq_len {seq_len}")
        stats["dropped_too_long"] += 1
        return None
    return seqs


def _padded(kept: list, seq_len: int, pad_id: int) -> EncodedPairs:
    """[(chosen ids, rejected ids, margin)] -> EncodedPairs right-padded with pad_id to seq_len."""
    n = len(kept)
    chosen = np.full((n, seq_len), pad_id, dtype=np.int32)  # (N, T)
    rejected = np.full((n, seq_len), pad_id, dtype=np.int32)  # (N, T)
    for j, (c, r, _) in enumerate(kept):
        chosen[j, : len(c)] = c
        rejected[j, : len(r)] = r
    return EncodedPairs(
        chosen_ids=chosen,
        rejected_ids=rejected,
        chosen_lengths=np.array([len(c) for c, _, _ in kept], dtype=np.int32),
        rejected_lengths=np.array([len(r) for _, r, _ in kept], dtype=np.int32),
        margins=np.array([m for _, _, m in kept], dtype=np.float32),
    )


# -----------------------------------------------------------------------------
# batching


class BatchIterator:
    """Endless, deterministic, resumable batches of pairs (EncodedPairs) or of ranked prompts
    (jaxrm.ranking_data.EncodedRankings): `data` has __len__, longest() and batch(idx).

    Epoch e visits the pairs in np.random.default_rng([seed, e]).permutation(N) order (or in file
    order when shuffle=False). With drop_last the tail of an epoch that does not fill a batch is
    skipped; without it the epoch ends with one smaller batch. state() is the position of the next
    batch: {"epoch": e, "index": number of pairs of epoch e already served}.

    rows=(start, stop): yield only those pairs of each (global) batch, e.g. this process's share
    in multi-process training (jaxrm.sharding.process_rows). The order, the position and the
    trimmed length T are those of the global batch, so every process agrees on them.
    """

    def __init__(
        self,
        data,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        group_by_length: int = 0,
        pad_multiple: int = 0,
        rows: tuple[int, int] | None = None,
    ):
        if not 1 <= batch_size <= len(data):
            raise DataError(
                f"batch_size {batch_size} must be between 1 and the number of pairs ({len(data)}); "
                f"lower batch_size or use more data"
            )
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.group_by_length, self.pad_multiple = group_by_length, pad_multiple
        if rows is not None and not (drop_last and 0 <= rows[0] < rows[1] <= batch_size):
            raise DataError(
                f"rows={rows} must be a non-empty range within batch_size={batch_size} (with drop_last)"
            )
        self.rows = rows
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = None, None

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's pair order; consecutive batch_size slices are its batches.

        group_by_length=G: the shuffled order is cut into windows of G batches, each window is
        sorted by pair length and its batches are shuffled again, so a batch holds pairs of
        similar length (less padding once trimmed to pad_multiple) and batches still come in
        random order.
        """
        if self._order_epoch != epoch:
            n = len(self.data)
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(n) if self.shuffle else np.arange(n)
            if self.group_by_length:
                order = self._grouped(order, rng)
            self._order, self._order_epoch = order, epoch
        return self._order

    def _grouped(self, order: np.ndarray, rng) -> np.ndarray:
        b, window = self.batch_size, self.batch_size * self.group_by_length
        length = self.data.longest()
        full = len(order) // b * b
        batches = []
        for start in range(0, full, window):
            chunk = order[start : min(start + window, full)]
            chunk = chunk[np.argsort(length[chunk], kind="stable")]
            batches += [chunk[i : i + b] for i in range(0, len(chunk), b)]
        batches = [batches[i] for i in rng.permutation(len(batches))]
        return np.concatenate(batches + [order[full:]])

    def state(self) -> dict:
        return {"epoch": int(self.epoch), "index": int(self.index)}

    def restore(self, state: dict) -> None:
        epoch, index = state.get("epoch"), state.get("index")
        if not (
            isinstance(epoch, int) and isinstance(index, int) and epoch >= 0 and 0 <= index <= len(self.data)
        ):
            raise DataError(f"bad data iterator state {state!r} for {len(self.data)} pairs")
        self.epoch, self.index = epoch, index

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        n, b = len(self.data), self.batch_size
        if self.index >= n or (self.drop_last and self.index + b > n):
            self.epoch, self.index = self.epoch + 1, 0
        idx = self.order(self.epoch)[self.index : self.index + b]
        self.index += len(idx)
        longest = int(self.data.longest()[idx].max())
        if self.rows is not None:  # this process's share of the global batch
            idx = idx[self.rows[0] : self.rows[1]]
        batch = self.data.batch(idx)
        if self.pad_multiple:  # trim padding columns: T = the global batch's longest pair, rounded up
            T = min(batch["input_ids"].shape[1], -(-longest // self.pad_multiple) * self.pad_multiple)
            batch["input_ids"] = batch["input_ids"][:, :T]  # (rows, T)
        return batch


def eval_batches(data, batch_size: int) -> Iterator[dict]:
    """One pass in order over pairs (or ranked prompts), every batch exactly batch_size of them
    (fixed shapes for jit). The last batch is filled up with copies of item 0; "valid" (B,) bool
    marks the real ones.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    n = len(data)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        valid = np.arange(batch_size) < len(idx)  # (B,)
        idx = np.concatenate([idx, np.zeros(batch_size - len(idx), dtype=idx.dtype)])  # (B,) filler = pair 0
        yield {**data.batch(idx), "valid": valid}


# -----------------------------------------------------------------------------
# a run's data


def load_split(run: RunConfig, tokenizer, path: str, source: str) -> tuple[EncodedPairs, dict]:
    """The pairs of one file (or datasets DIR[:SPLIT]) for `run`: read with its column names,
    tokenized and padded to its seq_len (default block_size); (EncodedPairs, stats). A file of
    rankings (jaxrm.ranking_formats) gives its ordered pairs, C(K, 2) per prompt without ties
    (stats["from_rankings"]: how many rankings)."""
    pairs, from_rankings = load_preference_pairs(path, run.train)
    return encode_run_pairs(run, tokenizer, pairs, source, from_rankings)


def load_preference_pairs(path: str, tc) -> tuple[list[PreferencePair], int]:
    """(the pairs of a pair file, 0), or (the ordered pairs of a rankings file, its rankings)."""
    pairs, rankings = load_pairs_or_rankings(path, Columns.from_train_config(tc))
    return (pairs, 0) if rankings is None else (ranking_pairs(rankings), len(rankings))


def encode_run_pairs(
    run: RunConfig, tokenizer, pairs, source: str, from_rankings: int = 0
) -> tuple[EncodedPairs, dict]:
    """encode_pairs with `run`'s settings: its seq_len (default block_size), PAD, truncation, lengths."""
    data, stats = encode_pairs(pairs, tokenizer, source=source, **run_encoding(run))
    return data, {**stats, "from_rankings": from_rankings} if from_rankings else stats


def run_encoding(run: RunConfig) -> dict:
    """`run`'s encoding keywords (encode_pairs, encode_rankings): seq_len (default block_size), pad_id,
    vocab_size, truncation, lengths."""
    seq_len = run.train.seq_len or run.model.block_size
    if seq_len > run.model.block_size:
        raise ValueError(f"seq_len={seq_len} exceeds the model's block_size={run.model.block_size}")
    return dict(
        seq_len=seq_len,
        pad_id=run.model.pad_id,
        vocab_size=run.model.vocab_size,
        truncation=run.train.truncation,
        lengths=run.train.lengths,
    )
