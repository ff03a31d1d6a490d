"""The reward model in Flax NNX: ids (B, T) -> rewards (B, T).

Mirrors torchref's module tree and parameter names (wte, wpe, h.{i}.ln_1, h.{i}.attn.c_attn,
h.{i}.attn.c_proj, h.{i}.ln_2, h.{i}.mlp.c_fc, h.{i}.mlp.c_proj, ln_f, reward_head) and its init.
No loss in here: see loss.py.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrm.config import ModelConfig

normal = jax.nn.initializers.normal
ACTIVATION_FNS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch nn.GELU() default: exact erf
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def _linear(config: ModelConfig, d_in: int, d_out: int, std: float, rngs: nnx.Rngs, **kwargs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, kernel_init=normal(std), bias_init=jax.nn.initializers.zeros,
                      dtype=jnp.dtype(config.dtype), param_dtype=jnp.float32, rngs=rngs, **kwargs)


def _layer_norm(config: ModelConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(config.d_model, epsilon=config.layer_norm_eps, dtype=jnp.float32,
                         param_dtype=jnp.float32, rngs=rngs)


def _dropout(x, rate: float, deterministic: bool, rngs: nnx.Rngs | None):
    if deterministic or rate == 0.0:
        return x
    if rngs is None:
        raise ValueError("dropout is on (deterministic=False) but no rngs were given: "
                         "call model(ids, deterministic=False, rngs=nnx.Rngs(dropout=seed))")
    keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class MHA(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        d = config.d_model
        self.config = config
        self.c_attn = _linear(config, d, 3 * d, 0.02, rngs)
        self.c_proj = _linear(config, d, d, 0.02 / math.sqrt(2 * config.num_layer), rngs)

    def __call__(self, x, deterministic: bool, rngs: nnx.Rngs | None):
        cfg = self.config
        B, T, C = x.shape
        q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
        q = q.reshape(B, T, cfg.num_heads, cfg.head_dim)  # (B, T, nh, hs)
        k = k.reshape(B, T, cfg.num_heads, cfg.head_dim)
        v = v.reshape(B, T, cfg.num_heads, cfg.head_dim)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)  # (B, nh, T, T)
        scores = scores * (1.0 / math.sqrt(cfg.head_dim))
        causal = jnp.tril(jnp.ones((T, T), dtype=bool))
        scores = jnp.where(causal, scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1)  # float32
        probs = _dropout(probs, cfg.attn_pdrop, deterministic, rngs)
        y = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)  # (B, T, nh, hs)
        y = y.reshape(B, T, C)  # (B, T, C)
        y = self.c_proj(y)
        return _dropout(y, cfg.resid_pdrop, deterministic, rngs)


class FeedForward(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.config = config
        self.c_fc = _linear(config, config.d_model, config.dff, 0.02, rngs)
        self.c_proj = _linear(config, config.dff, config.d_model, 0.02 / math.sqrt(2 * config.num_layer), rngs)

    def __call__(self, x, deterministic: bool, rngs: nnx.Rngs | None):
        x = ACTIVATION_FNS[self.config.activation](self.c_fc(x))
        x = self.c_proj(x)
        return _dropout(x, self.config.dropout, deterministic, rngs)


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.ln_1 = _layer_norm(config, rngs)
        self.attn = MHA(config, rngs)
        self.ln_2 = _layer_norm(config, rngs)
        self.mlp = FeedForward(config, rngs)

    def __call__(self, x, deterministic: bool, rngs: nnx.Rngs | None):
        x = x + self.attn(self.ln_1(x), deterministic, rngs)
        x = x + self.mlp(self.ln_2(x), deterministic, rngs)
        return x


class RewardModel(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.wte = nnx.Embed(config.vocab_size, config.d_model, embedding_init=normal(0.02), rngs=rngs)
        self.wpe = nnx.Embed(config.block_size, config.d_model, embedding_init=normal(0.02), rngs=rngs)
        self.h = nnx.List([Block(config, rngs) for _ in range(config.num_layer)])
        self.reward_head = nnx.Linear(config.d_model, 1, use_bias=False, kernel_init=normal(0.02),
                                      dtype=jnp.float32, rngs=rngs)
        self.ln_f = _layer_norm(config, rngs)

    def hidden_states(self, input_ids, deterministic: bool = True, rngs: nnx.Rngs | None = None):
        """The final-LayerNorm output (B, T, C): what the reward head reads."""
        check_input_ids(input_ids, self.config)
        B, T = input_ids.shape
        # mode="fill": an out-of-range id gives a NaN row under jit, never a silently clamped one.
        tok = jnp.take(self.wte.embedding[...], input_ids, axis=0, mode="fill", fill_value=jnp.nan)  # (B, T, C)
        x = tok + self.wpe.embedding[:T][None]  # (B, T, C)
        x = _dropout(x, self.config.embed_pdrop, deterministic, rngs)
        for block in self.h:
            x = block(x, deterministic, rngs)
        return self.ln_f(x)

    def __call__(self, input_ids, deterministic: bool = True, rngs: nnx.Rngs | None = None):
        x = self.hidden_states(input_ids, deterministic, rngs)
        return self.reward_head(x.astype(jnp.float32))[..., 0]  # (B, T) float32


def check_input_ids(input_ids, config: ModelConfig) -> None:
    """Clear errors for bad ids: shape and dtype always; values too when they are concrete (not traced)."""
    if getattr(input_ids, "ndim", None) != 2:
        raise ValueError(f"input_ids must have shape (B, T), got {getattr(input_ids, 'shape', type(input_ids))}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integers, got dtype {input_ids.dtype}")
    T = input_ids.shape[1]
    if T > config.block_size:
        raise ValueError(f"sequence length {T} exceeds block_size={config.block_size}")
    if isinstance(input_ids, jax.core.Tracer):
        return
    ids = np.asarray(input_ids)
    bad = (ids < 0) | (ids >= config.vocab_size)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(f"token id {ids[row, col]} at row {row}, position {col} is outside "
                         f"[0, vocab_size={config.vocab_size})")
