"""The reward model in Flax NNX: ids (B, T) -> rewards (B, T).

Mirrors torchref's module tree and parameter names (wte, wpe, h.{i}.ln_1, h.{i}.attn.c_attn,
h.{i}.attn.c_proj, h.{i}.ln_2, h.{i}.mlp.c_fc, h.{i}.mlp.c_proj, ln_f, reward_head) and its init.
No loss in here: see loss.py.
"""
from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

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
    return _dropout_key(x, rate, _next_dropout_key(rngs))


def _next_dropout_key(rngs: nnx.Rngs | None):
    if rngs is None:
        raise ValueError("dropout is on (deterministic=False) but no rngs were given: "
                         "call model(ids, deterministic=False, rngs=nnx.Rngs(dropout=seed))")
    return rngs.dropout()


def _fmix32(h):
    """MurmurHash3's 32-bit finalizer: a bijection of uint32 with full avalanche."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def dropout_bits(key, shape) -> jax.Array:
    """Uniform uint32 draws for dropout masks: a counter (each element's flat index) hashed twice,
    keyed by two words drawn from `key` with threefry. On XLA:CPU this is ~7x cheaper than
    jax.random.bits over the whole shape (benchmarks/NOTES.md); the words are uniform, independent
    of position and of other keys for the purposes of dropout (this is not a cryptographic PRNG).
    Being a function of the element index, the draws do not depend on how the array is sharded."""
    seed = jax.random.bits(key, (2,), jnp.uint32)
    counter = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    return _fmix32(_fmix32(counter ^ seed[0]) ^ seed[1])


def _dropout_key(x, rate: float, key):
    """Inverted dropout: drop where the uint32 draw < round(rate * 2**32); scale by the exact
    inverse of the resulting keep rate."""
    if key is None or rate == 0.0:
        return x
    threshold = int(round(rate * 2**32))
    keep = dropout_bits(key, x.shape) >= jnp.uint32(threshold)
    scale = 2**32 / (2**32 - threshold)
    return jnp.where(keep, x * jnp.asarray(scale, x.dtype), jnp.zeros_like(x))


# ----------------------------------------------------------------------------- functional core
# The modules below hold the parameters (names as in torchref); the math is these pure functions
# of a per-block parameter dict, so the same code runs unrolled or under lax.scan over layers.

def _layer_norm_fn(x, p, eps):
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    xc = x - mean
    var = (xc * xc).mean(-1, keepdims=True)
    return xc * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _linear_fn(x, p, dtype):
    """x @ kernel + bias with inputs in `dtype`, accumulated and biased in float32, returned in
    `dtype` (on XLA:CPU a bfloat16 dot with a float32 result runs ~2x faster than one with a
    bfloat16 result; benchmarks/NOTES.md)."""
    *lead, d_in = x.shape
    y = _matmul(x.reshape(-1, d_in).astype(dtype), p["kernel"].astype(dtype))  # (N, d_out) float32
    return (y + p["bias"]).astype(dtype).reshape(*lead, -1)


def _matmul(a, b, transpose_b: bool = False):
    """a @ b (or a @ b^T) over the last two axes, batched over the leading ones, accumulated and
    returned in float32. Below float32 its gradient is _low_precision_matmul's."""
    if a.dtype == jnp.float32:
        return _dot(a, b, transpose_b)
    return _low_precision_matmul(a, b, transpose_b)


def _dot(a, b, transpose_b: bool):
    batch = tuple(range(a.ndim - 2))
    contract = ((a.ndim - 1,), (b.ndim - 1 if transpose_b else b.ndim - 2,))
    return jax.lax.dot_general(a, b, (contract, (batch, batch)), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _low_precision_matmul(a, b, transpose_b):
    """Mixed precision as torch autocast runs a matmul: the backward pass takes the output's
    cotangent in the inputs' dtype and runs both of its matmuls in that dtype, accumulated in
    float32. Plain autodiff would run them in float32 (the cotangent of a float32 result), at
    about half the speed on CPUs with bfloat16 units."""
    return _dot(a, b, transpose_b)


def _low_precision_matmul_fwd(a, b, transpose_b):
    return _dot(a, b, transpose_b), (a, b)


def _low_precision_matmul_bwd(transpose_b, residuals, g):
    a, b = residuals
    g = g.astype(a.dtype)
    if transpose_b:  # y = a b^T: da = g b, db = g^T a
        da, db = _dot(g, b, False), _dot(_transpose_rows_major(g), a, False)
    else:            # y = a b: da = g b^T, db = a^T g
        da, db = _dot(g, b, True), _dot(_transpose_rows_major(a), g, False)
    return da.astype(a.dtype), db.astype(b.dtype)


_low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


def _transpose_rows_major(x):
    """x with its last two axes swapped, written out row-major on XLA:CPU. A plain transpose
    reaches a dot as a column-major view, and XLA:CPU then runs a bfloat16 dot in float32 through
    Eigen (~135 vs ~330 GFLOP/s for a weight gradient here); joining the transposes of two halves
    makes XLA write the result out, so the dot takes the fast library path (benchmarks/NOTES.md
    §15). Only for VJPs: no gradient is defined through it."""
    if not _can_join_halves(x):
        return jnp.swapaxes(x, -1, -2)
    return _join_halves(x, lambda half: jnp.swapaxes(half, -1, -2), axis=-1)


@jax.custom_vjp
def _rows_major(x):
    """x itself, written out row-major on XLA:CPU when it is a transpose (as in
    _transpose_rows_major); its gradient is the identity."""
    if not _can_join_halves(x):
        return x
    return _join_halves(x, lambda half: half, axis=-2)


_rows_major.defvjp(lambda x: (_rows_major(x), None), lambda _, g: (g,))


def _can_join_halves(x) -> bool:
    """The row-major copies are for XLA:CPU only, and need at least two rows."""
    return jax.default_backend() == "cpu" and x.shape[-2] >= 2


def _join_halves(x, each, axis: int):
    """each(first half of x's rows) and each(second half) joined along `axis`. The join runs on
    x's bits as unsigned integers of its width: XLA:CPU joins and transposes bfloat16 arrays by
    way of float32, integers directly (2x faster)."""
    n = x.shape[-2] // 2
    u = jax.lax.bitcast_convert_type(x, {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[x.dtype.itemsize])
    return jax.lax.bitcast_convert_type(jnp.concatenate([each(u[..., :n, :]), each(u[..., n:, :])], axis=axis),
                                        x.dtype)


def _use_sdpa(cfg: ModelConfig, key) -> bool:
    """jax.nn.dot_product_attention (cuDNN flash attention on GPUs) when asked for, or by default
    off CPU; never with attention dropout, which it does not have."""
    if key is not None and cfg.attn_pdrop:
        return False
    if cfg.attention == "auto":
        return jax.default_backend() != "cpu"
    return cfg.attention == "sdpa"


def _attention_fn(q, k, v, key, cfg: ModelConfig):
    """Causal softmax(q k^T / sqrt(d)) v for q, k, v (B, T, nh, hs); returns (B, T, nh, hs).

    Blocked: queries go in blocks of `cfg.attention_block` rows, and block [s, e) only meets keys
    [0, e), so the masked part above the diagonal blocks is never computed (at T=512 and blocks of
    128, 62.5% of the full T x T work). Each block's softmax is over all the keys it can see, so this
    is the plain formula, not an online-softmax approximation. Dropout on the probabilities draws
    one mask per block from fold_in(key, block index).
    """
    if _use_sdpa(cfg, key):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True).astype(v.dtype)
    T = q.shape[1]
    q, k, v = (_rows_major(x.transpose(0, 2, 1, 3)) for x in (q, k, v))  # (B, nh, T, hs)
    block = cfg.attention_block or T
    outputs = []
    for i, start in enumerate(range(0, T, block)):
        end = min(start + block, T)
        causal = np.arange(start, end)[:, None] >= np.arange(end)[None, :]  # (end - start, end)
        outputs.append(_attend(q[:, :, start:end], k[:, :, :end], v[:, :, :end], causal, cfg.attn_pdrop,
                               None if key is None else jax.random.fold_in(key, i)))  # (B, nh, end - start, hs)
    return jnp.concatenate(outputs, axis=2).transpose(0, 2, 1, 3)  # (B, T, nh, hs)


def _attend(q, k, v, visible, rate: float = 0.0, key=None):
    """softmax(q k^T / sqrt(d), -inf where not visible) v for q (B, nh, Tq, hs), k, v (B, nh, Tk, hs);
    scores, softmax and accumulation in float32, the result in v's dtype: (B, nh, Tq, hs)."""
    scores = _matmul(q, k, transpose_b=True) * (1.0 / math.sqrt(q.shape[-1]))  # (B, nh, Tq, Tk)
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    probs = _dropout_key(probs, rate, key)
    return _matmul(probs.astype(v.dtype), v).astype(v.dtype)  # (B, nh, Tq, hs)


def _mha_fn(x, p, cfg: ModelConfig, keys, remat: bool):
    B, T, C = x.shape
    dtype = jnp.dtype(cfg.dtype)
    qkv = _linear_fn(x, p["c_attn"], dtype)
    qkv = checkpoint_name(qkv, "qkv").reshape(B, T, 3, cfg.num_heads, cfg.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    attend = _attention_fn
    if remat:  # keep q, k, v for the backward pass, recompute the (B, nh, T, T) scores and probs
        attend = jax.checkpoint(_attention_fn, static_argnums=(4,))
    y = attend(q, k, v, None if keys is None else keys[0], cfg).reshape(B, T, C)  # (B, T, C)
    y = checkpoint_name(y, "attn_y")
    y = _linear_fn(y, p["c_proj"], dtype)
    return _dropout_key(y, cfg.resid_pdrop, None if keys is None else keys[1])


def _mlp_fn(x, p, cfg: ModelConfig, key):
    dtype = jnp.dtype(cfg.dtype)
    h = checkpoint_name(_linear_fn(x, p["c_fc"], dtype), "fc_h")
    x = ACTIVATION_FNS[cfg.activation](h)
    x = _linear_fn(x, p["c_proj"], dtype)
    return _dropout_key(x, cfg.dropout, key)


def _block_fn(x, p, cfg: ModelConfig, key, remat: bool):
    keys = None if key is None else jax.random.split(key, 3)
    x = x + _mha_fn(_layer_norm_fn(x, p["ln_1"], cfg.layer_norm_eps), p["attn"], cfg,
                    None if keys is None else keys[:2], remat)
    x = checkpoint_name(x, "x_mid")
    x = x + _mlp_fn(_layer_norm_fn(x, p["ln_2"], cfg.layer_norm_eps), p["mlp"], cfg,
                    None if keys is None else keys[2])
    return x


def _values(tree):
    """A module's Params as a plain nested dict of arrays (tracers under a transform)."""
    return nnx.to_pure_dict(nnx.state(tree, nnx.Param))


class MHA(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        d = config.d_model
        self.config = config
        self.c_attn = _linear(config, d, 3 * d, 0.02, rngs)
        self.c_proj = _linear(config, d, d, 0.02 / math.sqrt(2 * config.num_layer), rngs)

    def __call__(self, x, deterministic: bool, rngs: nnx.Rngs | None):
        key = _layer_key(self.config, deterministic, rngs)
        keys = None if key is None else jax.random.split(key, 2)
        return _mha_fn(x, _values(self), self.config, keys, remat=False)


class FeedForward(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.config = config
        self.c_fc = _linear(config, config.d_model, config.dff, 0.02, rngs)
        self.c_proj = _linear(config, config.dff, config.d_model, 0.02 / math.sqrt(2 * config.num_layer), rngs)

    def __call__(self, x, deterministic: bool, rngs: nnx.Rngs | None):
        return _mlp_fn(x, _values(self), self.config, _layer_key(self.config, deterministic, rngs))


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.config = config
        self.ln_1 = _layer_norm(config, rngs)
        self.attn = MHA(config, rngs)
        self.ln_2 = _layer_norm(config, rngs)
        self.mlp = FeedForward(config, rngs)

    def __call__(self, x, deterministic: bool, rngs: nnx.Rngs | None):
        key = _layer_key(self.config, deterministic, rngs)
        return _block_fn(x, _values(self), self.config, key, remat=False)


def _has_dropout(config: ModelConfig) -> bool:
    return any((config.attn_pdrop, config.resid_pdrop, config.dropout))


def _layer_key(config: ModelConfig, deterministic: bool, rngs: nnx.Rngs | None):
    if deterministic or not _has_dropout(config):
        return None
    return _next_dropout_key(rngs)


# Execution plan (ModelConfig.remat / scan_layers / remat_budget: the function computed is the
# same; measurements in benchmarks/NOTES.md). "auto" (default): when the activations a train step
# would store are small against the machine's RAM, run the blocks unrolled and store everything
# (fastest on CPU); when they are large (GPT-2 at T=512: ~10 GB), scan over the layers and
# recompute inside each block (2.6x less memory). Remat only takes effect under lax.scan on
# XLA:CPU, hence the pairing. remat="block" saves only qkv, the attention output, the mid-block
# residual and the MLP pre-activation per layer (LayerNorms, attention probs, GELU and dropout
# masks are recomputed in the backward pass); "attention" recomputes only the attention probs.


def _physical_memory() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def stored_activation_bytes(cfg: ModelConfig, B: int, T: int) -> float:
    """Rough size of what backprop through the unrolled model keeps (fitted to XLA:CPU's buffer
    assignment: ~4 tensors of width dff, ~12 of d_model and ~3 of nh*T per token and layer)."""
    per_token = 4 * cfg.dff + 12 * cfg.d_model + 3 * cfg.num_heads * T
    return 4.0 * per_token * B * T * cfg.num_layer


def execution_plan(cfg: ModelConfig, B: int, T: int) -> tuple[bool, str]:
    """(scan_layers, remat) for a (B, T) input under the config's plan fields."""
    remat = cfg.remat
    if remat == "auto":
        big = stored_activation_bytes(cfg, B, T) > cfg.remat_budget * _physical_memory()
        remat = "block" if big else "none"
    scan = remat != "none" if cfg.scan_layers == "auto" else cfg.scan_layers == "on"
    return scan and cfg.num_layer > 1, remat


_BLOCK_POLICY = jax.checkpoint_policies.save_only_these_names("qkv", "attn_y", "x_mid", "fc_h")


def _apply_block(x, p, cfg: ModelConfig, key, remat: str, in_scan: bool):
    if remat == "block":
        fn = jax.checkpoint(_block_fn, static_argnums=(2, 4), policy=_BLOCK_POLICY, prevent_cse=not in_scan)
        return fn(x, p, cfg, key, False)
    return _block_fn(x, p, cfg, key, remat == "attention")


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
        x = self._trunk(input_ids, deterministic, rngs, self.config.num_layer)
        return _layer_norm_fn(x, _values(self.ln_f), self.config.layer_norm_eps)

    def __call__(self, input_ids, deterministic: bool = True, rngs: nnx.Rngs | None = None):
        x = self.hidden_states(input_ids, deterministic, rngs)
        return self.reward_head(x.astype(jnp.float32))[..., 0]  # (B, T) float32

    def _trunk(self, input_ids, deterministic: bool, rngs: nnx.Rngs | None, num_blocks: int):
        """Embeddings and the first `num_blocks` blocks: the residual stream (B, T, C)."""
        cfg = self.config
        check_input_ids(input_ids, cfg)
        B, T = input_ids.shape
        # mode="fill": an out-of-range id gives a NaN row under jit, never a silently clamped one.
        tok = jnp.take(self.wte.embedding[...], input_ids, axis=0, mode="fill", fill_value=jnp.nan)  # (B, T, C)
        x = tok + self.wpe.embedding[:T][None]  # (B, T, C)
        x = _dropout(x, cfg.embed_pdrop, deterministic, rngs)
        key = _layer_key(cfg, deterministic, rngs)
        keys = None if key is None else jax.random.split(key, cfg.num_layer)
        params = [_values(self.h[i]) for i in range(num_blocks)]
        scan, remat = execution_plan(cfg, B, T)
        if scan and num_blocks > 1:
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *params)

            def body(x, layer):
                p, k = layer
                return _apply_block(x, p, cfg, k, remat, in_scan=True), None

            x, _ = jax.lax.scan(body, x, (stacked, None if keys is None else keys[:num_blocks]))
        else:
            for i, p in enumerate(params):
                x = _apply_block(x, p, cfg, None if keys is None else keys[i], remat, in_scan=False)
        return x

    def scores_at(self, input_ids, positions):
        """rewards[b, positions[b]] (B,) float32, as __call__ gives them (inference: no dropout).

        For scoring: the last block runs in full only where it is read. Its keys and values are
        computed at every position, its query, attention output, MLP, ln_f and head at one
        position per row, which saves most of one layer's work. A position outside [0, T) gives
        NaN, never a clamped or wrapped read.
        """
        cfg = self.config
        B, T = input_ids.shape
        C, nh, hs, eps, dtype = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.layer_norm_eps, jnp.dtype(cfg.dtype)
        x = self._trunk(input_ids, True, None, cfg.num_layer - 1)  # (B, T, C)
        p = _values(self.h[cfg.num_layer - 1])
        positions = jnp.asarray(positions, jnp.int32)
        valid = (positions >= 0) & (positions < T)
        at = jnp.clip(positions, 0, T - 1)[:, None, None]                      # (B, 1, 1)
        h = _layer_norm_fn(x, p["ln_1"], eps)                                   # (B, T, C)
        c_attn = p["attn"]["c_attn"]
        kv = _linear_fn(h, {"kernel": c_attn["kernel"][:, C:], "bias": c_attn["bias"][C:]}, dtype)
        kv = kv.reshape(B, T, 2, nh, hs).transpose(2, 0, 3, 1, 4)               # (2, B, nh, T, hs)
        q = _linear_fn(jnp.take_along_axis(h, at, axis=1),
                       {"kernel": c_attn["kernel"][:, :C], "bias": c_attn["bias"][:C]}, dtype)
        q = q.reshape(B, 1, nh, hs).transpose(0, 2, 1, 3)                       # (B, nh, 1, hs)
        visible = jnp.arange(T)[None, None, None, :] <= at[:, :, :, None]       # (B, 1, 1, T)
        y = _attend(q, kv[0], kv[1], visible).reshape(B, 1, C)                  # (B, nh, 1, hs) -> (B, 1, C)
        x = jnp.take_along_axis(x, at, axis=1) + _linear_fn(y, p["attn"]["c_proj"], dtype)
        x = x + _mlp_fn(_layer_norm_fn(x, p["ln_2"], eps), p["mlp"], cfg, None)  # (B, 1, C)
        x = _layer_norm_fn(x, _values(self.ln_f), eps)
        scores_at = self.reward_head(x.astype(jnp.float32))[:, 0, 0]           # (B,)
        return jnp.where(valid, scores_at, jnp.nan)


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
