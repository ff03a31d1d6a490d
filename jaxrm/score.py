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


class ScoreInputError(ValueError):
    """A text or id sequence that cannot be scored; the message names it by index."""


def length_buckets(max_len: int, smallest: int = 32) -> list[int]:
    """Padded lengths: powers of two from `smallest` below max_len, then max_len."""
    buckets, n = [], smallest
    while n < max_len:
        buckets.append(n)
        n *= 2
    return buckets + [max_len]


def batch_buckets(max_batch: int) -> list[int]:
    """Padded batch sizes: powers of four below max_batch, then max_batch."""
    buckets, n = [], 1
    while n < max_batch:
        buckets.append(n)
        n *= 4
    return buckets + [max_batch]


def _bucket(buckets: list[int], n: int) -> int:
    return next(b for b in buckets if b >= n)


class Scorer:
    """A model ready to score: its tokenizer, the input checks, and one compiled scores_at per
    (batch, length) bucket. Sequences longer than max_len lose tokens from the left
    (truncation="left", as RewardBench does) or are refused (truncation="error")."""

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
        graphdef, state = nnx.split(model)
        self._state = state
        self._forward = jax.jit(lambda s, ids, at: nnx.merge(graphdef, s).scores_at(ids, at))
        self._forward_layout = jax.jit(lambda s, rows: _layout_rewards(nnx.merge(graphdef, s), rows))

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

    def length_bucket(self, n: int) -> int:
        return _bucket(self.lengths, n)

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
        """Compile every (batch, length) bucket; the seconds it took."""
        started = time.perf_counter()
        for B in self.batches:
            for T in self.lengths:
                self.run_batch([[0] * T] * B)
        return time.perf_counter() - started


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
