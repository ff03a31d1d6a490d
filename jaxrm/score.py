"""Scoring: texts -> the reward at each text's last token (the original's end score)."""

from __future__ import annotations

import numpy as np
from flax import nnx

from jaxrm.config import RunConfig
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
