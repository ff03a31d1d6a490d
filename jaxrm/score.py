"""Scoring: texts -> the reward at each text's last token (the original's end score)."""

from __future__ import annotations

import numpy as np
from flax import nnx

from jaxrm.config import RunConfig
from jaxrm.layouts import layout_rows
from jaxrm.model import RewardModel
from jaxrm.tokenizer import first_out_of_range, get_tokenizer


def score_texts(model: RewardModel, run: RunConfig, texts: list[str], batch_size: int = 32) -> list[float]:
    tokenizer = get_tokenizer(run.train.tokenizer)
    encoded = []
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text)
        if not ids:
            raise ValueError(f"text {i} is empty: nothing to score")
        encoded.append(ids)
    return score_ids(model, run, encoded, batch_size)


def score_ids(
    model: RewardModel, run: RunConfig, sequences: list[list[int]], batch_size: int = 32
) -> list[float]:
    """Token-id sequences -> the reward at each one's last token (index len - 1).

    With the run's lengths="first_pad" (the original) a PAD id inside a sequence is refused, since
    training ended sequences there; with lengths="explicit" it is an ordinary token, as in training.
    """
    config = model.config
    explicit = run.train.lengths == "explicit"
    for i, ids in enumerate(sequences):
        if not len(ids):
            raise ValueError(f"text {i} is empty: nothing to score")
        if len(ids) > config.block_size:
            raise ValueError(f"text {i} has {len(ids)} tokens, more than block_size={config.block_size}")
        if first_out_of_range(ids, config.vocab_size) is not None or (not explicit and config.pad_id in ids):
            raise ValueError(
                f"text {i} encodes to an id the model reserves or lacks (pad {config.pad_id}"
                + ("" if explicit else "; train with --lengths=explicit to allow it inside a text")
                + ")"
            )
    forward = nnx.jit(lambda m, ids, positions: m.scores_at(ids, positions))  # the last block only where read
    scores = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        T = min(config.block_size, -(-max(map(len, chunk)) // 16) * 16)  # round up: fewer recompiles
        ids = np.full((len(chunk), T), config.pad_id, np.int32)  # (B, T)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = seq
        last = np.asarray([len(seq) - 1 for seq in chunk], np.int32)  # (B,) the true last token
        scores += np.asarray(forward(model, ids, last)).tolist()
    return scores


def score_responses(model: RewardModel, run: RunConfig, prompt: str, responses: list[str]) -> list[float]:
    """The reward at the last token of prompt + each response, with the prompt encoded once: one
    row [prompt][response 1]...[response K] whose responses restart their position ids where the
    prompt ends and see only the prompt and themselves (jaxrm.layouts, TrainConfig.layout
    "shared"), so each reward is the one score_texts gives for prompt + response, within float32
    rounding. The prompt is the token prefix all the encoded sequences share (a BPE merge across
    the boundary stays in the response), less one token when a response would be left empty."""
    tokenizer = get_tokenizer(run.train.tokenizer)
    sequences = [tokenizer.encode(prompt + response) for response in responses]
    _check_responses(model.config, run, sequences)
    p = min(min(map(len, sequences)) - 1, _common_prefix(sequences))
    group = (np.asarray(sequences[0][:p]), [np.asarray(s[p:]) for s in sequences], p)
    rows, starts = layout_rows([group], [[0]], model.config.pad_id)
    last = np.asarray([start + len(s) - p - 1 for start, s in zip(starts[0], sequences, strict=True)])
    rewards = _forward_rows(model, rows)  # (1, L)
    return np.asarray(rewards).reshape(-1)[last].tolist()


def _check_responses(config, run: RunConfig, sequences: list[list[int]]) -> None:
    """score_ids' refusals, for prompt + response sequences (an error names the response)."""
    explicit = run.train.lengths == "explicit"
    for i, ids in enumerate(sequences):
        if len(ids) > config.block_size:
            raise ValueError(
                f"response {i}: {len(ids)} tokens with the prompt, more than block_size={config.block_size}"
            )
        if first_out_of_range(ids, config.vocab_size) is not None or (not explicit and config.pad_id in ids):
            raise ValueError(
                f"response {i} encodes to an id the model reserves or lacks (pad {config.pad_id})"
            )
    if not sequences or not all(sequences):
        raise ValueError("score_responses needs at least one response, each non-empty with the prompt")


def _common_prefix(sequences: list[list[int]]) -> int:
    n = 0
    for column in zip(*sequences, strict=False):
        if any(x != column[0] for x in column):
            break
        n += 1
    return n


@nnx.jit
def _forward_rows(model: RewardModel, rows: dict):
    return model(
        rows["input_ids"],
        positions=rows["positions"],
        segment_ids=rows["segment_ids"],
        branch_ids=rows["branch_ids"],
    )
