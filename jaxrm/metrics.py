"""Batch statistics of a pair batch: one definition for the train step (under jit) and for
evaluation (jaxrm/evaluate.py calls the same function on the per-pair arrays of a whole data set).

Denominators: accuracy, margin and the reward means / standard deviations are over the
non-identical pairs (an identical pair has no rejected score and no loss term); the loss is
normalized by jaxrm.loss.reduce_loss, as TrainConfig.normalize_by says.
"""

from __future__ import annotations

import jax.numpy as jnp


def counted_mean(x, identical):
    """Mean of the (bs,) values `x` over the non-identical pairs (0 when there is none)."""
    counted = ~identical
    return jnp.where(counted, x, 0.0).sum() / jnp.maximum(counted.sum(), 1)


def pair_metrics(chosen, rejected, identical, loss) -> dict:
    """accuracy (chosen end score > rejected), the given loss, margin (chosen - rejected) and
    the mean and standard deviation of each side's end scores, over the non-identical pairs.

    chosen, rejected: (bs,) end scores; identical: (bs,) bool; loss: () already normalized.
    """
    mean = lambda x: counted_mean(x, identical)
    std = lambda x: jnp.sqrt(mean((x - mean(x)) ** 2))
    return {
        "accuracy": mean((chosen > rejected).astype(jnp.float32)),
        "loss": loss,
        "margin": mean(chosen - rejected),
        "chosen_mean": mean(chosen),
        "chosen_std": std(chosen),
        "rejected_mean": mean(rejected),
        "rejected_std": std(rejected),
    }
