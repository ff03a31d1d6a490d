"""The reward model: a GPT-2-style causal transformer with a scalar head at every position,
ids (B, T) -> rewards (B, T). Read top to bottom: the layers, the block, the model.

A functional model in an NNX shell. The modules below hold the parameters, under the seed's
names (wte, wpe, h.{i}.ln_1, h.{i}.attn.c_attn, h.{i}.attn.c_proj, h.{i}.ln_2, h.{i}.mlp.c_fc,
h.{i}.mlp.c_proj, ln_f, reward_head) and with its init; the forward pass is the pure functions
of a parameter dict that come first. Why: the same block function then runs unrolled or under
lax.scan over layers (jaxrm/plan.py) while every layer keeps its own parameters, so conversion
to and from torchref, the optimizer's ndim >= 2 decay rule, fsdp sharding and checkpoints all
see the seed's per-layer tensors. Under scan the per-layer parameters are stacked inside the
compiled step (one extra copy of the block weights, counted in the benchmark's memory table).

How the math runs fast (bfloat16 matmuls, XLA:CPU layouts, hashed dropout, blocked attention)
is in jaxrm/kernels.py; which way it runs on which devices is in jaxrm/plan.py. No loss here:
see jaxrm/loss.py.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxrm import kernels
from jaxrm.config import INIT_STD, ModelConfig
from jaxrm.plan import Plan, devices_of, execution_plan, run_blocks
from jaxrm.tokenizer import first_out_of_range

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch nn.GELU() default: exact erf
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

# ----------------------------------------------------------------------------- layers
# Pure functions of a parameter dict p (one module's params, as nnx.to_pure_dict gives them).
# Matmuls take inputs in cfg.dtype and accumulate in float32; LayerNorm, softmax and the head
# run in float32.


def layer_norm(p, x, eps: float):
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    xc = x - mean
    var = (xc * xc).mean(-1, keepdims=True)
    return xc * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def linear(p, x, cfg: ModelConfig, plan: Plan):
    """x @ kernel + bias: inputs in cfg.dtype, accumulated and biased in float32, returned in
    cfg.dtype (on XLA:CPU a bfloat16 dot with a float32 result runs ~2x faster than one with a
    bfloat16 result; benchmarks/NOTES.md)."""
    dtype = jnp.dtype(cfg.dtype)
    *lead, d_in = x.shape
    rows = x.reshape(-1, d_in).astype(dtype)  # (N, d_in)
    y = kernels.matmul(rows, p["kernel"].astype(dtype), False, plan.cpu_layouts)  # (N, d_out) float32
    return (y + p["bias"]).astype(dtype).reshape(*lead, -1)  # (..., d_out)


def split_heads(x, cfg: ModelConfig):
    """(B, T, n * C) -> n arrays (B, T, nh, hs): the query, key, value parts of a fused projection."""
    B, T, _ = x.shape
    parts = x.reshape(B, T, -1, cfg.num_heads, cfg.head_dim)  # (B, T, n, nh, hs)
    return [parts[:, :, i] for i in range(parts.shape[2])]


def causal_self_attention(p, x, cfg: ModelConfig, plan: Plan, attn_key, resid_key, segments=None):
    """The seed's MHA: fused qkv, causal softmax attention with dropout, output projection and
    residual dropout. x (B, T, C) -> (B, T, C). segments: kernels.causal_attention's mask, or None."""
    B, T, C = x.shape
    qkv = checkpoint_name(linear(p["c_attn"], x, cfg, plan), "qkv")  # (B, T, 3C)
    q, k, v = split_heads(qkv, cfg)  # each (B, T, nh, hs)
    y = kernels.causal_attention(q, k, v, attn_key, cfg, plan, segments).reshape(B, T, C)  # (B, T, C)
    y = linear(p["c_proj"], checkpoint_name(y, "attn_y"), cfg, plan)
    return kernels.dropout(y, cfg.resid_pdrop, resid_key)


def mlp(p, x, cfg: ModelConfig, plan: Plan, key):
    """The seed's FeedForward: Linear, GELU, Linear, dropout. x (B, T, C) -> (B, T, C)."""
    h = checkpoint_name(linear(p["c_fc"], x, cfg, plan), "fc_h")  # (B, T, dff)
    y = linear(p["c_proj"], ACTIVATIONS[cfg.activation](h), cfg, plan)
    return kernels.dropout(y, cfg.dropout, key)


# ----------------------------------------------------------------------------- the block


def block(p, x, cfg: ModelConfig, plan: Plan, key, segments=None):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x)). x (B, T, C)."""
    attn_key, resid_key, mlp_key = (None, None, None) if key is None else jax.random.split(key, 3)
    h = layer_norm(p["ln_1"], x, cfg.layer_norm_eps)
    x = x + causal_self_attention(p["attn"], h, cfg, plan, attn_key, resid_key, segments)
    x = checkpoint_name(x, "x_mid")
    return x + mlp(p["mlp"], layer_norm(p["ln_2"], x, cfg.layer_norm_eps), cfg, plan, mlp_key)


def block_at(p, x, at, cfg: ModelConfig, plan: Plan):
    """block(p, x) read at one position per row, for inference: x (B, T, C), at (B, 1, 1) ->
    (B, 1, C). Keys and values are computed at every position, everything else only at `at`."""
    B, T, C = x.shape
    h = layer_norm(p["ln_1"], x, cfg.layer_norm_eps)  # (B, T, C)
    query_part, key_value_part = _query_and_key_value(p["attn"]["c_attn"], C)
    k, v = split_heads(linear(key_value_part, h, cfg, plan), cfg)  # each (B, T, nh, hs)
    (q,) = split_heads(
        linear(query_part, jnp.take_along_axis(h, at, axis=1), cfg, plan), cfg
    )  # (B, 1, nh, hs)
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # (B, nh, 1 or T, hs)
    visible = jnp.arange(T)[None, None, None, :] <= at[:, :, :, None]  # (B, 1, 1, T)
    y = kernels.attend(q, k, v, visible).reshape(B, 1, C)  # (B, nh, 1, hs) -> (B, 1, C)
    x = jnp.take_along_axis(x, at, axis=1) + linear(p["attn"]["c_proj"], y, cfg, plan)  # (B, 1, C)
    return x + mlp(p["mlp"], layer_norm(p["ln_2"], x, cfg.layer_norm_eps), cfg, plan, None)


def block_at_reads(p, x, rows, cols, segment_ids, cfg: ModelConfig, plan: Plan):
    """block(p, x, segments=(segment_ids, 0)) read at N places of packed rows, for inference:
    x (R, W, C), rows and cols (N,) int32 in range, segment_ids (R, W) -> (N, C). A read sees the
    tokens of its own segment in its own row up to itself. Keys and values are computed at every
    position, everything else only at the reads; each read meets the keys of all rows, masked
    (N x R*W scores: no copy of its row's keys)."""
    R, W, C = x.shape
    h = layer_norm(p["ln_1"], x, cfg.layer_norm_eps).reshape(1, R * W, C)  # (1, R*W, C) rows end to end
    query_part, key_value_part = _query_and_key_value(p["attn"]["c_attn"], C)
    k, v = split_heads(linear(key_value_part, h, cfg, plan), cfg)  # each (1, R*W, nh, hs)
    reads = rows * W + cols  # (N,) places in the rows laid end to end
    (q,) = split_heads(linear(query_part, h[:, reads], cfg, plan), cfg)  # (1, N, nh, hs)
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # (1, nh, N or R*W, hs)
    place = jnp.arange(R * W)  # (R*W,)
    segment = segment_ids.reshape(-1)  # (R*W,)
    visible = (
        (place[None, :] // W == rows[:, None])
        & (place[None, :] <= reads[:, None])
        & (segment[None, :] == segment[reads][:, None])
    )  # (N, R*W): same row, not after the read, same segment
    y = kernels.attend(q, k, v, visible[None, None])  # (1, nh, N, hs)
    y = y.transpose(0, 2, 1, 3).reshape(-1, 1, C)  # (N, 1, C)
    x = x.reshape(R * W, C)[reads][:, None] + linear(p["attn"]["c_proj"], y, cfg, plan)  # (N, 1, C)
    return (x + mlp(p["mlp"], layer_norm(p["ln_2"], x, cfg.layer_norm_eps), cfg, plan, None))[:, 0]


def _query_and_key_value(c_attn, C: int) -> tuple[dict, dict]:
    """The fused qkv projection's query part and key-value part, as two linear() params."""
    query_part = {"kernel": c_attn["kernel"][:, :C], "bias": c_attn["bias"][:C]}
    return query_part, {"kernel": c_attn["kernel"][:, C:], "bias": c_attn["bias"][C:]}


# ----------------------------------------------------------------------------- the model


class MHA(nnx.Module):
    """Parameters of causal_self_attention (the seed's MHA)."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        d = config.d_model
        self.c_attn = _linear(d, 3 * d, INIT_STD, rngs)
        self.c_proj = _linear(d, d, _residual_std(config), rngs)


class FeedForward(nnx.Module):
    """Parameters of mlp (the seed's FeedForward)."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.c_fc = _linear(config.d_model, config.dff, INIT_STD, rngs)
        self.c_proj = _linear(config.dff, config.d_model, _residual_std(config), rngs)


class Block(nnx.Module):
    """Parameters of block."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.ln_1 = _layer_norm(config, rngs)
        self.attn = MHA(config, rngs)
        self.ln_2 = _layer_norm(config, rngs)
        self.mlp = FeedForward(config, rngs)


class RewardModel(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        normal = jax.nn.initializers.normal(INIT_STD)
        self.wte = nnx.Embed(config.vocab_size, config.d_model, embedding_init=normal, rngs=rngs)
        self.wpe = nnx.Embed(config.block_size, config.d_model, embedding_init=normal, rngs=rngs)
        self.h = nnx.List([Block(config, rngs) for _ in range(config.num_layer)])
        self.reward_head = nnx.Linear(config.d_model, 1, use_bias=False, kernel_init=normal, rngs=rngs)
        self.ln_f = _layer_norm(config, rngs)

    def __call__(
        self,
        input_ids,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
        plan=None,
        *,
        positions=None,
        segment_ids=None,
        branch_ids=None,
    ):
        """Rewards (B, T) float32 at every position. Dropout only with deterministic=False (then
        `rngs` gives the dropout keys). `plan`: a jaxrm.plan.Plan; default: for the ids' devices.

        For rows that hold a prompt once and its answers after it (TrainConfig.layout "shared"),
        or several such groups (layout "packed"): `positions` (B, T) int32, each token's position
        id (default: 0..T-1, today's causal positions, bit-identical); `segment_ids` and
        `branch_ids` (B, T) int32: a token attends to earlier tokens of its own segment that are
        in branch 0 (the prompt) or in its own branch (its answer); see
        kernels.segment_visibility. Row length T may then exceed block_size; positions may not.
        """
        x = self.hidden_states(
            input_ids,
            deterministic,
            rngs,
            plan,
            positions=positions,
            segment_ids=segment_ids,
            branch_ids=branch_ids,
        )  # (B, T, C)
        return _reward_head(self.reward_head.kernel[...], x)

    def hidden_states(
        self,
        input_ids,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
        plan=None,
        *,
        positions=None,
        segment_ids=None,
        branch_ids=None,
    ):
        """The final-LayerNorm output (B, T, C): what the reward head reads (arguments: __call__)."""
        params, cfg = self._params(), self.config
        check_input_ids(input_ids, cfg, positions)
        plan = plan or _plan_for(input_ids, cfg)
        key = _dropout_key(cfg, cfg.embed_pdrop, deterministic, rngs)
        x = _embed(params, input_ids, cfg, key, positions)
        segments = _segments(input_ids, segment_ids, branch_ids)
        layer = block if segments is None else functools.partial(block, segments=segments)
        keys = _layer_keys(cfg, deterministic, rngs)
        x = run_blocks(layer, _blocks(params, cfg.num_layer), x, cfg, plan, keys)  # (B, T, C)
        return layer_norm(params["ln_f"], x, cfg.layer_norm_eps)

    def scores_at(self, input_ids, positions, plan=None):
        """rewards[b, positions[b]] (B,) float32, as __call__ gives them (inference: no dropout).

        For scoring: the last block runs only where it is read (block_at), which saves most of one
        layer's work. A position outside [0, T) gives NaN, never a clamped or wrapped read.
        """
        params, cfg = self._params(), self.config
        check_input_ids(input_ids, cfg)
        B, T = input_ids.shape
        plan = plan or _plan_for(input_ids, cfg)
        x = _embed(params, input_ids, cfg, None)
        *first, last = _blocks(params, cfg.num_layer)
        x = run_blocks(block, first, x, cfg, plan, None)  # (B, T, C)
        positions = jnp.asarray(positions, jnp.int32)
        at = jnp.clip(positions, 0, T - 1)[:, None, None]  # (B, 1, 1)
        x = layer_norm(params["ln_f"], block_at(last, x, at, cfg, plan), cfg.layer_norm_eps)  # (B, 1, C)
        scores = _reward_head(params["reward_head"]["kernel"], x)[:, 0]  # (B,)
        return jnp.where((positions >= 0) & (positions < T), scores, jnp.nan)

    def scores_packed(self, input_ids, positions, segment_ids, rows, cols, plan=None):
        """The rewards at N (row, column) places of packed rows (inference: no dropout), (N,)
        float32. input_ids, positions and segment_ids are (R, W): each row holds sequences one
        after another, each with its own segment id and position ids from 0 (padding: a segment
        of its own). rows and cols (N,) int32: where to read; a read at a sequence's last token
        is the reward scores_at gives that sequence alone (within float32 rounding). The last
        block runs only at the reads (block_at_reads); a place outside the rows gives NaN."""
        params, cfg = self._params(), self.config
        check_input_ids(input_ids, cfg, positions)
        R, W = input_ids.shape
        plan = plan or _plan_for(input_ids, cfg)
        x = _embed(params, input_ids, cfg, None, positions)
        segments = _segments(input_ids, segment_ids, None)
        *first, last = _blocks(params, cfg.num_layer)
        x = run_blocks(functools.partial(block, segments=segments), first, x, cfg, plan, None)  # (R, W, C)
        rows, cols = jnp.asarray(rows, jnp.int32), jnp.asarray(cols, jnp.int32)
        inside = (rows >= 0) & (rows < R) & (cols >= 0) & (cols < W)
        rows_in, cols_in = jnp.clip(rows, 0, R - 1), jnp.clip(cols, 0, W - 1)
        x = block_at_reads(last, x, rows_in, cols_in, segments[0], cfg, plan)  # (N, C)
        x = layer_norm(params["ln_f"], x, cfg.layer_norm_eps)
        scores = _reward_head(params["reward_head"]["kernel"], x)  # (N,)
        return jnp.where(inside, scores, jnp.nan)  # (N,)

    def _params(self) -> dict:
        """The parameters as a plain nested dict of arrays (tracers under a transform)."""
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))


def _embed(params, input_ids, cfg: ModelConfig, key, positions=None):
    """Token + position embeddings with dropout: (B, T) -> (B, T, C); positions (B, T) or None for
    0..T-1. An out-of-range id or position gives a NaN row under jit (mode="fill"), never a
    silently clamped one (check_input_ids refuses it eagerly)."""
    T = input_ids.shape[1]
    wte, wpe = params["wte"]["embedding"], params["wpe"]["embedding"]
    tok = jnp.take(wte, input_ids, axis=0, mode="fill", fill_value=jnp.nan)  # (B, T, C)
    if positions is None:
        pos = wpe[:T][None]  # (1, T, C)
    else:
        pos = jnp.take(wpe, jnp.asarray(positions, jnp.int32), axis=0, mode="fill", fill_value=jnp.nan)
    return kernels.dropout(tok + pos, cfg.embed_pdrop, key)  # (B, T, C)


def _segments(input_ids, segment_ids, branch_ids):
    """(segment_ids, branch_ids) (B, T) int32 each for kernels.causal_attention, or None when
    neither is given (plain causal attention); a missing one is all zeros."""
    if segment_ids is None and branch_ids is None:
        return None
    zeros = jnp.zeros(input_ids.shape, jnp.int32)
    as_ids = lambda x: zeros if x is None else jnp.asarray(x, jnp.int32)
    segment_ids, branch_ids = as_ids(segment_ids), as_ids(branch_ids)
    for name, x in (("segment_ids", segment_ids), ("branch_ids", branch_ids)):
        if x.shape != input_ids.shape:
            raise ValueError(f"{name} must have input_ids' shape {input_ids.shape}, got {x.shape}")
    return segment_ids, branch_ids


def _reward_head(kernel, x):
    """(..., C) -> (...,) float32: the scalar head, a Linear(C, 1) without bias."""
    return (x.astype(jnp.float32) @ kernel)[..., 0]


def _blocks(params, num_layer: int) -> list:
    return [params["h"][i] for i in range(num_layer)]


def _plan_for(input_ids, cfg: ModelConfig) -> Plan:
    B, T = input_ids.shape
    return execution_plan(cfg, B, T, devices_of(input_ids))


def _dropout_key(cfg: ModelConfig, rate: float, deterministic: bool, rngs: nnx.Rngs | None):
    """A fresh dropout key from rngs when this dropout is on; else None."""
    if deterministic or not rate:
        return None
    if rngs is None:
        raise ValueError(
            "dropout is on (deterministic=False) but no rngs were given: "
            "call model(ids, deterministic=False, rngs=nnx.Rngs(dropout=seed))"
        )
    return rngs.dropout()


def _layer_keys(cfg: ModelConfig, deterministic: bool, rngs: nnx.Rngs | None):
    """One dropout key per block (each split into attention, residual and MLP keys), or None."""
    layer_rate = max(cfg.attn_pdrop, cfg.resid_pdrop, cfg.dropout)
    key = _dropout_key(cfg, layer_rate, deterministic, rngs)
    return None if key is None else jax.random.split(key, cfg.num_layer)


def _linear(d_in: int, d_out: int, std: float, rngs: nnx.Rngs) -> nnx.Linear:
    zeros = jax.nn.initializers.zeros
    return nnx.Linear(d_in, d_out, kernel_init=jax.nn.initializers.normal(std), bias_init=zeros, rngs=rngs)


def _layer_norm(config: ModelConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(config.d_model, epsilon=config.layer_norm_eps, rngs=rngs)


def _residual_std(config: ModelConfig) -> float:
    """The seed's scaled init of each c_proj (GPT-2): INIT_STD / sqrt(2 * num_layer)."""
    return INIT_STD / math.sqrt(2 * config.num_layer)


def check_input_ids(input_ids, config: ModelConfig, positions=None) -> None:
    """Clear errors for bad ids (and position ids): shape and dtype always; values too when they
    are concrete (not traced). Without positions the row length is the position limit."""
    if getattr(input_ids, "ndim", None) != 2:
        raise ValueError(
            f"input_ids must have shape (B, T), got {getattr(input_ids, 'shape', type(input_ids))}"
        )
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integers, got dtype {input_ids.dtype}")
    T = input_ids.shape[1]
    if positions is None and T > config.block_size:
        raise ValueError(f"sequence length {T} exceeds block_size={config.block_size}")
    if positions is not None:
        _check_positions(positions, input_ids.shape, config)
    if isinstance(input_ids, jax.core.Tracer):
        return
    bad = first_out_of_range(input_ids, config.vocab_size)
    if bad is not None:
        row, col, token = bad
        raise ValueError(
            f"token id {token} at row {row}, position {col} is outside [0, vocab_size={config.vocab_size})"
        )


def _check_positions(positions, shape, config: ModelConfig) -> None:
    """positions must have the ids' shape and, when concrete, lie in [0, block_size)."""
    if getattr(positions, "shape", None) != tuple(shape):
        raise ValueError(
            f"positions must have input_ids' shape {tuple(shape)}, got {getattr(positions, 'shape', None)}"
        )
    if isinstance(positions, jax.core.Tracer):
        return
    bad = first_out_of_range(positions, config.block_size)
    if bad is not None:
        row, col, value = bad
        raise ValueError(
            f"position id {value} at row {row}, column {col} is outside [0, block_size={config.block_size})"
        )
