"""Scoring: texts -> the reward at each text's last token (the original's end score)."""
from __future__ import annotations

import numpy as np
from flax import nnx

from jaxrm.config import RunConfig
from jaxrm.model import RewardModel
from jaxrm.tokenizer import get_tokenizer


def score_texts(model: RewardModel, run: RunConfig, texts: list[str], batch_size: int = 32) -> list[float]:
    tokenizer = get_tokenizer(run.train.tokenizer)
    config = model.config
    encoded = []
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text)
        if not ids:
            raise ValueError(f"text {i} is empty: nothing to score")
        if len(ids) > config.block_size:
            raise ValueError(f"text {i} has {len(ids)} tokens, more than block_size={config.block_size}")
        if config.pad_id in ids or max(ids) >= config.vocab_size:
            raise ValueError(f"text {i} encodes to an id the model reserves or lacks (pad {config.pad_id})")
        encoded.append(ids)
    forward = nnx.jit(lambda m, ids: m(ids))
    scores = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        T = min(config.block_size, -(-max(map(len, chunk)) // 16) * 16)  # round up: fewer recompiles
        ids = np.full((len(chunk), T), config.pad_id, np.int32)  # (B, T)
        for row, seq in enumerate(chunk):
            ids[row, :len(seq)] = seq
        rewards = np.asarray(forward(model, ids))  # (B, T)
        scores += [float(rewards[row, len(seq) - 1]) for row, seq in enumerate(chunk)]
    return scores
