"""Evaluation on the host: an eval step over a data set in fixed-size batches, then the same
statistics as the train step reports (jaxrm.metrics.pair_metrics) over all its pairs at once."""

from __future__ import annotations

import jax
import numpy as np

from jaxrm.config import TrainConfig
from jaxrm.data import EncodedPairs, eval_batches
from jaxrm.loss import loss_denominators, reduce_loss
from jaxrm.metrics import pair_metrics
from jaxrm.sharding import shard_batch

PER_PAIR = ("chosen", "rejected", "identical", "loss", "centered")  # what an eval step returns, (B,) each


def per_pair_outputs(eval_step, params, data: EncodedPairs, batch_size: int, limit: int = 0) -> dict:
    """The eval step's per-pair arrays over `data` (its first `limit` pairs if > 0), on the host."""
    parts = {key: [] for key in PER_PAIR}
    seen = 0
    for batch in eval_batches(data, batch_size):
        out = jax.device_get(eval_step(params, shard_batch(batch, None, batch_size, lengths=True)))
        for key in PER_PAIR:
            parts[key].append(out[key][batch["valid"]])
        seen += int(batch["valid"].sum())
        if limit and seen >= limit:
            break
    return {key: np.concatenate(values)[: limit or None] for key, values in parts.items()}


def evaluate(
    eval_step,
    params,
    data: EncodedPairs,
    batch_size: int,
    limit: int = 0,
    train_config: TrainConfig | None = None,
) -> dict:
    """pairs (the number of non-identical pairs), accuracy, loss, margin and reward statistics over
    `data` (its first `limit` pairs if > 0), as the train step computes them for one batch: the
    loss normalized as train_config says (default: TrainConfig()'s), the rest over the
    non-identical pairs (jaxrm.metrics). `eval_step` comes from jaxrm.step.make_eval_step."""
    tc = train_config or TrainConfig()
    out = per_pair_outputs(eval_step, params, data, batch_size, limit)
    loss = reduce_loss(
        out["loss"],
        out["centered"],
        *loss_denominators(out["identical"], tc.normalize_by),
        tc.center_rewards_coef,
    )
    stats = pair_metrics(out["chosen"], out["rejected"], out["identical"], loss)
    return {"pairs": int((~out["identical"]).sum()), **{key: float(value) for key, value in stats.items()}}
