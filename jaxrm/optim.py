"""AdamW as the original's configure_optimizers builds it, with nanoGPT's schedule and clipping.

Weight decay applies exactly to parameters with ndim >= 2 (matmul weights, embeddings and the
reward head); biases and LayerNorm scales are not decayed.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


def decay_mask(params):
    """True where a parameter is decayed: the original's `p.dim() >= 2` rule."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def describe_decay(params) -> str:
    """The same two lines the original's configure_optimizers prints."""
    leaves = jax.tree.leaves(params)
    decay = [p for p in leaves if p.ndim >= 2]
    nodecay = [p for p in leaves if p.ndim < 2]
    return (
        f"num decayed parameter tensors: {len(decay)}, with {sum(p.size for p in decay):,} parameters\n"
        f"num non-decayed parameter tensors: {len(nodecay)}, with {sum(p.size for p in nodecay):,} parameters"
    )


def learning_rate(step, *, peak: float, min_lr: float, warmup_steps: int, decay_steps: int):
    """nanoGPT's get_lr: linear warmup, cosine decay to min_lr at decay_steps, then flat.

    `step` is the 0-based index of the update about to be made (a Python int or a jnp scalar).
    """
    step = jnp.asarray(step, jnp.float32)
    warm = peak * (step + 1) / (warmup_steps + 1)
    ratio = jnp.clip((step - warmup_steps) / max(decay_steps - warmup_steps, 1), 0.0, 1.0)
    cosine = min_lr + 0.5 * (1.0 + jnp.cos(math.pi * ratio)) * (peak - min_lr)
    return jnp.where(step < warmup_steps, warm, jnp.where(step > decay_steps, min_lr, cosine))


class ClipState(NamedTuple):
    pass


def clip_by_global_norm_like_torch(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6)).

    optax.clip_by_global_norm has no 1e-6 and so differs from torch at the last bits.
    """

    def init(params):
        del params
        return ClipState()

    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(init, update)


def make_optimizer(train_config, params) -> optax.GradientTransformation:
    """Clipping (if grad_clip > 0) then AdamW with the decay mask and the nanoGPT schedule."""
    tc = train_config
    schedule = lambda count: learning_rate(
        count,
        peak=tc.learning_rate,
        min_lr=tc.min_lr,
        warmup_steps=tc.warmup_steps,
        decay_steps=tc.decay_steps,
    )
    adamw = optax.adamw(
        schedule, b1=tc.beta1, b2=tc.beta2, eps=tc.eps, weight_decay=tc.weight_decay, mask=decay_mask(params)
    )
    if tc.grad_clip > 0:
        return optax.chain(clip_by_global_norm_like_torch(tc.grad_clip), adamw)
    return adamw
