"""Scoring: texts -> the reward at each text's last token (the original's end score), padded to a
few fixed shapes so that one compile per shape serves every call; and reward normalization."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time

import jax
import numpy as np
from flax import nnx

from jaxrm.config import RunConfig
from jaxrm.evaluate import per_pair_outputs
from jaxrm.layouts import layout_rows
from jaxrm.model import RewardModel
from jaxrm.tokenizer import first_out_of_range, get_tokenizer

NORMALIZATION = "normalization.json"  # in a run directory: {"mean", "std", "count", "source"}
TRUNCATIONS = ("left", "error")
DEFAULT_CALL_COST = 32.0  # padded tokens; about what a call of the `small` shape costs on a 2-core CPU
MEASURE_PASSES = 2  # warm_up times each compiled shape this many times (the fastest counts) ...
MEASURE_TOKENS = 2048  # ... up to this many padded tokens a call on a CPU (bigger: per row, linear)


class ScoreInputError(ValueError):
    """A text or id sequence that cannot be scored; the message names it by index."""


def length_buckets(max_len: int, smallest: int = 32) -> list[int]:
    """Padded lengths below max_len, then max_len: `smallest` times powers of two and 1.5 times
    those (32, 48, 64, 96, 128, ...), so a sequence is padded by at most a third of its bucket."""
    buckets, n = [], smallest
    while n < max_len:
        buckets += [b for b in (n, n * 3 // 2) if b < max_len]
        n *= 2
    return buckets + [max_len]


def batch_buckets(max_batch: int) -> list[int]:
    """Padded batch sizes: powers of two below max_batch, then max_batch."""
    buckets, n = [], 1
    while n < max_batch:
        buckets.append(n)
        n *= 2
    return buckets + [max_batch]


def _bucket(buckets: list[int], n: int) -> int:
    return next(b for b in buckets if b >= n)


def plan_calls(
    lengths: list[int], batches: list[int], buckets: list[int], cost
) -> tuple[list[list[int]], float]:
    """The cheapest split of sequences of these `lengths` into device calls of the padded shapes
    (batches x buckets): (lists of indices into `lengths`, each at most batches[-1] long; their
    total cost).

    cost(R, W) is what one call of R rows of width W costs (Scorer.call_cost); a call of n
    sequences whose longest has length l runs as bucket(batches, n) x bucket(buckets, l). When
    cost never falls as W grows, some cheapest split groups the sequences in runs of the
    length-sorted order, so a dynamic program over that order finds it exactly:
    O(len(lengths) * batches[-1]).
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    padded_batch = [0] + [_bucket(batches, n) for n in range(1, batches[-1] + 1)]  # by call size
    best = [0.0] + [math.inf] * len(order)  # best[j]: cheapest cost of the j shortest sequences
    start = [0] * (len(order) + 1)  # start[j]: where the last call of that cheapest split starts
    for j in range(1, len(order) + 1):
        padded_length = _bucket(buckets, lengths[order[j - 1]])
        for i in range(max(0, j - batches[-1]), j):
            total = best[i] + cost(padded_batch[j - i], padded_length)
            if total < best[j]:
                best[j], start[j] = total, i
    calls, j = [], len(order)
    while j:
        calls.append(order[start[j] : j])
        j = start[j]
    return calls[::-1], best[-1]


def token_cost(R: int, W: int) -> float:
    """A call's cost before any is measured: its padded tokens plus DEFAULT_CALL_COST."""
    return R * W + DEFAULT_CALL_COST


def pack_rows(lengths: list[int], width: int) -> list[list[int]]:
    """Sequences of these lengths (each at most `width`) packed into rows of at most `width`
    tokens, first fit in decreasing order of length: the indices of each row's sequences."""
    rows, used = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, tokens in enumerate(used) if tokens + lengths[i] <= width), None)
        if row is None:
            rows.append([i])
            used.append(lengths[i])
        else:
            rows[row].append(i)
            used[row] += lengths[i]
    return rows


class Scorer:
    """A model ready to score: its tokenizer, the input checks, and one compiled scores_at per
    (batch, length) bucket. Sequences longer than max_len lose tokens from the left
    (truncation="left", as RewardBench does) or are refused (truncation="error").

    Two ways to run: run_batch() pads each sequence to a row of its own (score()); run_rows()
    packs several sequences one after another into each row (scores_packed), as plan() arranges
    them for the server. plan() weighs the calls it could make by call_cost(R, W): the seconds
    warm_up() measured for that compiled shape (padded tokens plus DEFAULT_CALL_COST until then)."""

    def __init__(
        self,
        model: RewardModel,
        tokenizer,
        explicit_lengths: bool = False,
        max_len: int = 0,
        truncation: str = "left",
        max_batch: int = 32,
    ):
        if truncation not in TRUNCATIONS:
            raise ValueError(f"truncation={truncation!r}; valid: {', '.join(TRUNCATIONS)}")
        cfg = model.config
        if not 0 <= max_len <= cfg.block_size:
            raise ValueError(f"max_len={max_len} must be 1..block_size={cfg.block_size} (0: block_size)")
        self.config, self.tokenizer, self.explicit = cfg, tokenizer, explicit_lengths
        self.max_len, self.truncation = max_len or cfg.block_size, truncation
        self.lengths = length_buckets(self.max_len)
        self.batches = batch_buckets(max_batch)
        self.call_seconds: dict[tuple[int, int], float] = {}  # (rows, width) -> warm_up's timing
        graphdef, state = nnx.split(model)
        self._state = state
        self._forward = jax.jit(lambda s, ids, at: nnx.merge(graphdef, s).scores_at(ids, at))
        self._forward_layout = jax.jit(lambda s, rows: _layout_rewards(nnx.merge(graphdef, s), rows))
        self._packed = jax.jit(lambda s, *rows: nnx.merge(graphdef, s).scores_packed(*rows))
        self._compiled: dict[tuple[int, int], object] = {}  # (rows, width) -> warm_up's executable

    @classmethod
    def for_run(cls, model: RewardModel, run: RunConfig, **options) -> Scorer:
        return cls(model, get_tokenizer(run.train.tokenizer), run.train.lengths == "explicit", **options)

    def encode(self, texts: list[str]) -> tuple[list[list[int]], int]:
        """(checked, truncated ids per text, how many were truncated)."""
        return self.prepare([self.tokenizer.encode(text) for text in texts], "text")

    def encode_responses(
        self, prompt: str, responses: list[str], where: str = ""
    ) -> tuple[list[list[int]], int]:
        """(checked, truncated ids of prompt + each response, how many were truncated), as encode
        makes them; an error names the response (after `where`, e.g. "FILE:LINE: ")."""
        if not responses:
            raise ScoreInputError(f"{where}no responses to score")
        return self.prepare([self.tokenizer.encode(prompt + r) for r in responses], f"{where}response")

    def prepare(self, sequences, what: str = "sequence") -> tuple[list[list[int]], int]:
        """Checked ids, truncated from the left to max_len; (ids, how many were truncated)."""
        cfg, out, truncated = self.config, [], 0
        for i, ids in enumerate(sequences):
            ids = [int(t) for t in ids]
            if not ids:
                raise ScoreInputError(f"{what} {i} is empty: nothing to score")
            if len(ids) > self.max_len:
                if self.truncation == "error":
                    raise ScoreInputError(
                        f"{what} {i} has {len(ids)} tokens, more than the limit {self.max_len} "
                        f"(truncation=error; the default truncation=left keeps the last {self.max_len})"
                    )
                ids, truncated = ids[-self.max_len :], truncated + 1
            bad = first_out_of_range(ids, cfg.vocab_size)
            if bad is not None or (not self.explicit and cfg.pad_id in ids):
                token = bad[1] if bad is not None else cfg.pad_id
                raise ScoreInputError(
                    f"{what} {i} holds token id {token}, which the model reserves or lacks (ids "
                    f"0..{cfg.vocab_size - 1}, pad {cfg.pad_id}"
                    + ("" if self.explicit else "; train with --lengths=explicit to allow pad inside a text")
                    + ")"
                )
            out.append(ids)
        return out, truncated

    def call_cost(self, R: int, W: int) -> float:
        """What one run_rows call of R rows of width W (bucket sizes) costs: the seconds warm_up
        measured, else token_cost (padded tokens plus a call's fixed cost)."""
        return self.call_seconds[R, W] if self.call_seconds else token_cost(R, W)

    def plan(self, sequences: list[list[int]]) -> list[list[list[int]]]:
        """At most max_batch prepared sequences -> device calls for run_rows: each call a list of
        rows, each row the indices of its sequences. For each width bucket that holds the longest,
        the sequences are packed into rows that wide (pack_rows) and the rows split into calls of
        the bucket shapes (plan_calls); the cheapest of these by call_cost wins."""
        if len(sequences) > self.batches[-1]:
            raise ValueError(f"{len(sequences)} sequences to plan, more than max_batch={self.batches[-1]}")
        lengths = [len(s) for s in sequences]
        best, best_cost = [], math.inf
        for width in (w for w in self.lengths if w >= max(lengths)):
            rows = pack_rows(lengths, width)
            filled = [sum(lengths[i] for i in row) for row in rows]
            calls, cost = plan_calls(filled, self.batches, self.lengths, self.call_cost)
            if cost < best_cost:
                best, best_cost = [[rows[r] for r in call] for call in calls], cost
        return best

    def run_rows(self, rows: list[list[list[int]]]) -> np.ndarray:
        """One device call of packed rows, each a list of prepared sequences (at most the largest
        batch bucket of rows, max_batch sequences in all, max_len tokens a row): their rewards
        (n,) float32, in row order."""
        reads = self.batches[-1]
        if sum(map(len, rows)) > reads or max(sum(map(len, row)) for row in rows) > self.max_len:
            raise ValueError(f"more than {reads} sequences, or a row over max_len={self.max_len} tokens")
        R = _bucket(self.batches, len(rows))
        W = _bucket(self.lengths, max(sum(map(len, row)) for row in rows))
        ids = np.full((R, W), self.config.pad_id, np.int32)  # (R, W): sequences one after another, PAD
        positions = np.zeros((R, W), np.int32)  # (R, W): from 0 in each sequence
        segments = np.full((R, W), -1, np.int32)  # (R, W): k in a row's k-th sequence, -1 in PAD
        read_rows, read_cols = np.zeros((reads,), np.int32), np.zeros((reads,), np.int32)  # (reads,)
        n = 0
        for r, row in enumerate(rows):
            start = 0
            for k, seq in enumerate(row):
                end = start + len(seq)
                ids[r, start:end], positions[r, start:end], segments[r, start:end] = seq, range(len(seq)), k
                read_rows[n], read_cols[n], start, n = r, end - 1, end, n + 1
        forward = self._compiled.get((R, W), self._packed)
        packed = forward(self._state, ids, positions, segments, read_rows, read_cols)
        return np.asarray(packed)[:n]  # the reads past n (at row 0, column 0) are discarded

    def run_batch(self, sequences: list[list[int]]) -> np.ndarray:
        """One device batch of prepared sequences (at most the largest batch bucket): (n,) float32."""
        B, T = _bucket(self.batches, len(sequences)), _bucket(self.lengths, max(map(len, sequences)))
        ids = np.full((B, T), self.config.pad_id, np.int32)  # (B, T), rows past the sequences all PAD
        last = np.zeros((B,), np.int32)  # (B,) the true last token of each row
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = seq
            last[row] = len(seq) - 1
        return np.asarray(self._forward(self._state, ids, last))[: len(sequences)]

    def score(self, sequences: list[list[int]]) -> list[float]:
        """Prepared sequences -> rewards, in batches of the largest batch bucket."""
        step = self.batches[-1]
        return [
            float(r) for i in range(0, len(sequences), step) for r in self.run_batch(sequences[i : i + step])
        ]

    def score_shared(self, groups: list[list[list[int]]]) -> list[list[float]]:
        """Prepared sequences in groups, each group one prompt + its responses (encode_responses)
        -> each group's rewards. Each group's common prefix is encoded once per row: rows
        [prefix][suffix 1][suffix 2]... of at most max_len tokens (shared_prefix_rows), whose
        suffixes restart their position ids where the prefix ends and see only the prefix and
        themselves (jaxrm.layouts, TrainConfig.layout "shared"); so each reward is the one score
        gives for that sequence, within float32 rounding. Rows in batches of the largest batch bucket."""
        rows = [row for group in groups for row in shared_prefix_rows(group, self.max_len)]
        step = self.batches[-1]
        flat = [r for i in range(0, len(rows), step) for r in self.run_shared_rows(rows[i : i + step])]
        ends = np.cumsum([len(group) for group in groups])
        return [flat[end - len(group) : end] for group, end in zip(groups, ends, strict=True)]

    def run_shared_rows(self, groups: list[tuple]) -> list[float]:
        """One device batch of shared_prefix_rows groups, one row each, padded to the (batch,
        length) buckets: the reward at each suffix's last token, in order."""
        tokens, starts = layout_rows(
            groups, [[g] for g in range(len(groups))], self.config.pad_id, multiple=1
        )
        R, L = tokens["input_ids"].shape
        B, T = _bucket(self.batches, R), _bucket(self.lengths, L)
        fill = {"input_ids": self.config.pad_id}  # padding rows and columns: PAD tokens of segment 0
        padded = {
            name: np.pad(x, ((0, B - R), (0, T - L)), constant_values=fill.get(name, 0))
            for name, x in tokens.items()
        }  # (B, T)
        rewards = np.asarray(self._forward_layout(self._state, padded))  # (B, T)
        out = []
        for (_, suffixes, _), group_starts in zip(groups, starts, strict=True):
            for start, suffix in zip(group_starts, suffixes, strict=True):
                row, column = divmod(start, L)
                out.append(float(rewards[row, column + len(suffix) - 1]))
        return out

    def warm_up(self) -> float:
        """Compile run_rows for every (rows, width) bucket ahead of time (run_rows calls these
        executables, so no call traces or compiles), then time each (call_seconds); the seconds
        it all took. (score() and run_batch compile their shapes when they first meet them.)"""
        started = time.perf_counter()
        reads = jax.ShapeDtypeStruct((self.batches[-1],), np.int32)
        for R in self.batches:
            for W in self.lengths:
                rows = jax.ShapeDtypeStruct((R, W), np.int32)  # ids, positions, segment ids
                lowered = self._packed.lower(self._state, rows, rows, rows, reads, reads)
                self._compiled[R, W] = lowered.compile()
        self.call_seconds = self._measure_calls()
        return time.perf_counter() - started

    def _measure_calls(self, passes: int = MEASURE_PASSES) -> dict[tuple[int, int], float]:
        """Seconds of one run_rows call per (rows, width) bucket. Shapes of at most MEASURE_TOKENS
        padded tokens (and one row of any width; on an accelerator, every shape) are timed: the
        fastest of `passes` calls of R rows of one W-token sequence each, after an untimed one.
        Taller shapes cost what the tallest timed one of their width costs per row (on a CPU,
        calls that big grow linearly). Then made monotone: a shape is charged at least any shape
        it holds (a faster reading of a bigger one is noise)."""
        limit = MEASURE_TOKENS if jax.default_backend() == "cpu" else math.inf
        timed = [(R, W) for R in self.batches for W in self.lengths if R == 1 or R * W <= limit]
        seconds = dict.fromkeys(timed, math.inf)
        for n in range(passes + 1):
            for R, W in timed:
                started = time.perf_counter()
                self.run_rows([[[0] * W]] * R)
                if n:  # the first pass only warms up
                    seconds[R, W] = min(seconds[R, W], time.perf_counter() - started)
        for i, R in enumerate(self.batches):
            for j, W in enumerate(self.lengths):
                if (R, W) not in seconds:  # taller than what was timed: per row as the tallest timed
                    tallest = max(r for r, w in timed if w == W)
                    seconds[R, W] = seconds[tallest, W] * R / tallest
                smaller = [seconds[self.batches[i - 1], W]] if i else []
                smaller += [seconds[R, self.lengths[j - 1]]] if j else []
                seconds[R, W] = max([seconds[R, W], *smaller])
        return seconds


def score_texts(model: RewardModel, run: RunConfig, texts: list[str], batch_size: int = 32) -> list[float]:
    """Texts -> the reward at each one's last token; over-long texts truncated from the left."""
    scorer = Scorer.for_run(model, run, max_batch=batch_size)
    return scorer.score(scorer.encode(texts)[0])


def score_ids(
    model: RewardModel, run: RunConfig, sequences: list[list[int]], batch_size: int = 32
) -> list[float]:
    """Token-id sequences -> the reward at each one's last token (index len - 1); longer than
    block_size is an error. With the run's lengths="first_pad" (the original) a PAD id inside a
    sequence is refused, since training ended sequences there; with lengths="explicit" it is an
    ordinary token, as in training."""
    scorer = Scorer.for_run(model, run, max_batch=batch_size, truncation="error")
    return scorer.score(scorer.prepare(sequences)[0])


def score_responses(
    model: RewardModel,
    run: RunConfig,
    prompt: str,
    responses: list[str],
    truncation: str = "left",
    batch_size: int = 32,
) -> list[float]:
    """The reward at the last token of prompt + each response, with the prompt encoded once
    (Scorer.score_shared): each reward is the one score_texts gives for prompt + response, within
    float32 rounding. Over block_size tokens, prompt + response keeps its last tokens
    (truncation="left": the prompt loses its start first, as score_texts cuts a text) or is refused
    (truncation="error", naming the response)."""
    scorer = Scorer.for_run(model, run, max_batch=batch_size, truncation=truncation)
    return scorer.score_shared([scorer.encode_responses(prompt, responses)[0]])[0]


def _layout_rewards(model: RewardModel, rows: dict):
    """Rewards (R, L) of layout rows (jaxrm.layouts.layout_rows' input_ids, positions,
    segment_ids, branch_ids)."""
    return model(
        rows["input_ids"],
        positions=rows["positions"],
        segment_ids=rows["segment_ids"],
        branch_ids=rows["branch_ids"],
    )


def shared_prefix_rows(sequences: list[list[int]], max_len: int) -> list[tuple]:
    """Layout groups (prefix ids, [suffix ids, ...], p) (jaxrm.layouts.layout_rows) that hold
    `sequences` (prompt + response ids, each at most max_len tokens) in order, one group per row of
    at most max_len tokens: the prefix is the sequences' common first p tokens (less one when a
    sequence would be left empty), then as many of the next suffixes as fit."""
    p = min(min(map(len, sequences)) - 1, _common_prefix(sequences))
    prefix = np.asarray(sequences[0][:p], np.int32)
    groups, suffixes, room = [], [], max_len - p
    for seq in sequences:
        suffix = np.asarray(seq[p:], np.int32)
        if suffixes and len(suffix) > room:  # this row is full: the prefix again in a new row
            groups.append((prefix, suffixes, p))
            suffixes, room = [], max_len - p
        suffixes.append(suffix)
        room -= len(suffix)
    return groups + [(prefix, suffixes, p)]


def _common_prefix(sequences: list[list[int]]) -> int:
    n = 0
    for column in zip(*sequences, strict=False):
        if any(x != column[0] for x in column):
            break
        n += 1
    return n


# -----------------------------------------------------------------------------
# normalization: (r - mean) / std with the mean and std of the validation rewards


@dataclasses.dataclass(frozen=True)
class Normalization:
    mean: float
    std: float
    count: int = 0  # how many rewards the statistics came from
    source: str = ""

    def apply(self, rewards, clip: tuple[float, float] | None = None) -> list[float]:
        out = (np.asarray(rewards, np.float64) - self.mean) / self.std
        return clip_rewards(out, clip)


def clip_rewards(rewards, clip: tuple[float, float] | None) -> list[float]:
    out = np.asarray(rewards, np.float64)
    return (np.clip(out, *clip) if clip else out).tolist()


def reward_normalization(rewards, source: str = "") -> Normalization:
    rewards = np.asarray(rewards, np.float64)
    if rewards.size < 2 or not np.isfinite(rewards).all():
        raise ValueError(f"reward normalization needs at least 2 finite rewards, got {rewards.size}")
    std = float(rewards.std())
    if std == 0.0:
        raise ValueError("reward normalization: every reward is the same (std 0)")
    return Normalization(float(rewards.mean()), std, int(rewards.size), source)


def validation_normalization(eval_step, params, data, batch_size: int, source: str) -> Normalization:
    """Mean and std of the rewards of every validation text: chosen and rejected (an identical
    pair's text counted once)."""
    out = per_pair_outputs(eval_step, params, data, batch_size)
    rewards = np.concatenate([out["chosen"], out["rejected"][~out["identical"]]])
    return reward_normalization(rewards, source)


def write_normalization(run_dir, norm: Normalization) -> pathlib.Path:
    path = pathlib.Path(run_dir) / NORMALIZATION
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(norm), indent=2) + "\n")
    tmp.replace(path)
    return path


def read_normalization(source) -> Normalization | None:
    """A run directory's normalization.json, or the OpenRLHF fields (normalize_reward, mean, std)
    of a transformers config.json; None when there is neither."""
    source = pathlib.Path(source)
    path, hf = source / NORMALIZATION, source / "config.json"
    try:
        if path.is_file():
            d = json.loads(path.read_text())
            norm = Normalization(
                float(d["mean"]), float(d["std"]), int(d.get("count", 0)), d.get("source", "")
            )
        elif hf.is_file() and "mean" in (d := json.loads(hf.read_text())) and "std" in d:
            path, norm = hf, Normalization(float(d["mean"]), float(d["std"]), 0, str(hf))
        else:
            return None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a valid normalization ({e!r})") from None
    if not (math.isfinite(norm.mean) and math.isfinite(norm.std) and norm.std > 0):
        raise ValueError(f"{path}: mean {norm.mean} / std {norm.std} must be finite with std > 0")
    return norm
