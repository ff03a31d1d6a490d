"""How the model's math runs fast. model.py says what is computed; these functions compute it.

Each function computes exactly the formula in its docstring; what they add is speed or memory
(every choice is measured in benchmarks/NOTES.md):
- matmul: float32 accumulation, and a bfloat16 backward pass as torch autocast runs it;
- row-major copies: XLA:CPU sends a bfloat16 dot to its fast library path only when no operand
  is a column-major (transposed) view, so transposes are written out (CPU only: `cpu_layouts`);
- dropout: masks from a counter hash, ~7x cheaper than threefry bits on CPU;
- causal_attention: blocked causal attention that skips the blocks above the diagonal, or
  jax.nn.dot_product_attention (cuDNN flash attention on GPUs); both take an optional segment
  mask (segment_visibility) for rows that hold a shared prompt and several answers, or several pairs.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------- matmul


def matmul(a, b, transpose_b: bool = False, cpu_layouts: bool = False):
    """a @ b (or a @ b^T) over the last two axes, batched over the leading ones, accumulated and
    returned in float32. Below float32 its gradient is _low_precision_matmul's."""
    if a.dtype == jnp.float32:
        return _dot(a, b, transpose_b)
    return _low_precision_matmul(a, b, transpose_b, cpu_layouts)


def _dot(a, b, transpose_b: bool):
    batch = tuple(range(a.ndim - 2))
    contract = ((a.ndim - 1,), (b.ndim - 1 if transpose_b else b.ndim - 2,))
    return jax.lax.dot_general(a, b, (contract, (batch, batch)), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _low_precision_matmul(a, b, transpose_b, cpu_layouts):
    """Mixed precision as torch autocast runs a matmul: the backward pass takes the output's
    cotangent in the inputs' dtype and runs both of its matmuls in that dtype, accumulated in
    float32. Plain autodiff would run them in float32 (the cotangent of a float32 result), at
    about half the speed on CPUs with bfloat16 units."""
    return _dot(a, b, transpose_b)


def _low_precision_matmul_fwd(a, b, transpose_b, cpu_layouts):
    return _dot(a, b, transpose_b), (a, b)


def _low_precision_matmul_bwd(transpose_b, cpu_layouts, residuals, g):
    a, b = residuals
    g = g.astype(a.dtype)
    if transpose_b:  # y = a b^T: da = g b, db = g^T a
        da, db = _dot(g, b, False), _dot(transpose_rows_major(g, cpu_layouts), a, False)
    else:  # y = a b: da = g b^T, db = a^T g
        da, db = _dot(g, b, True), _dot(transpose_rows_major(a, cpu_layouts), g, False)
    return da.astype(a.dtype), db.astype(b.dtype)


_low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)

# ----------------------------------------------------------------------------- row-major copies


def transpose_rows_major(x, cpu_layouts: bool):
    """x with its last two axes swapped, written out row-major on XLA:CPU. A plain transpose
    reaches a dot as a column-major view, and XLA:CPU then runs a bfloat16 dot in float32 through
    Eigen (~135 vs ~330 GFLOP/s for a weight gradient here); joining the transposes of two halves
    makes XLA write the result out, so the dot takes the fast library path (benchmarks/NOTES.md
    §15). Only for VJPs: no gradient is defined through it."""
    if not _can_join_halves(x, cpu_layouts):
        return jnp.swapaxes(x, -1, -2)
    return _join_halves(x, lambda half: jnp.swapaxes(half, -1, -2), axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def rows_major(x, cpu_layouts: bool):
    """x itself, written out row-major on XLA:CPU when it is a transpose (as in
    transpose_rows_major); its gradient is the identity."""
    if not _can_join_halves(x, cpu_layouts):
        return x
    return _join_halves(x, lambda half: half, axis=-2)


rows_major.defvjp(lambda x, cpu_layouts: (rows_major(x, cpu_layouts), None), lambda _, __, g: (g,))


def _can_join_halves(x, cpu_layouts: bool) -> bool:
    """The row-major copies are for XLA:CPU only, and need at least two rows."""
    return cpu_layouts and x.shape[-2] >= 2


def _join_halves(x, each, axis: int):
    """each(first half of x's rows) and each(second half) joined along `axis`. The join runs on
    x's bits as unsigned integers of its width: XLA:CPU joins and transposes bfloat16 arrays by
    way of float32, integers directly (2x faster)."""
    n = x.shape[-2] // 2
    bits = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[x.dtype.itemsize]
    u = jax.lax.bitcast_convert_type(x, bits)
    joined = jnp.concatenate([each(u[..., :n, :]), each(u[..., n:, :])], axis=axis)
    return jax.lax.bitcast_convert_type(joined, x.dtype)


# ----------------------------------------------------------------------------- dropout


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


def dropout(x, rate: float, key):
    """Inverted dropout: drop where the uint32 draw < round(rate * 2**32); scale by the exact
    inverse of the resulting keep rate. No key or rate 0: x unchanged."""
    if key is None or rate == 0.0:
        return x
    threshold = int(round(rate * 2**32))
    keep = dropout_bits(key, x.shape) >= jnp.uint32(threshold)
    scale = 2**32 / (2**32 - threshold)
    return jnp.where(keep, x * jnp.asarray(scale, x.dtype), jnp.zeros_like(x))


# ----------------------------------------------------------------------------- attention


def causal_attention(q, k, v, key, cfg, plan, segments=None):
    """Causal softmax(q k^T / sqrt(d)) v with dropout on the probabilities (rate cfg.attn_pdrop,
    when `key` is given) for q, k, v (B, T, nh, hs); returns (B, T, nh, hs).

    segments: None (plain causal attention), or (segment_ids, branch_ids), each (B, T) int32: then
    query i also needs segment_visibility (same segment; key in the shared prefix, branch 0, or in
    the query's own branch). plan.attention "sdpa": jax.nn.dot_product_attention, which has no
    attention dropout (so the blocked form runs whenever dropout is on). plan.remat "attention":
    the probabilities are recomputed in the backward pass instead of stored.
    """
    attention = _sdpa_causal_attention if runs_sdpa(plan, cfg, key is not None) else blocked_causal_attention
    if plan.remat == "attention":
        attention = jax.checkpoint(attention, static_argnums=(4, 5))
    return attention(q, k, v, key, cfg, plan, segments)


def runs_sdpa(plan, cfg, dropout: bool) -> bool:
    """Whether causal_attention runs jax.nn.dot_product_attention (else the blocked form): the plan
    says sdpa and no attention dropout is drawn (`dropout`: a dropout key is given)."""
    return plan.attention == "sdpa" and not (dropout and cfg.attn_pdrop)


def segment_visibility(segments, q_start: int, q_end: int, k_end: int):
    """(B, 1, q_end - q_start, k_end) bool: which keys [0, k_end) queries [q_start, q_end) may see
    besides causality. segments = (segment_ids, branch_ids), each (B, T): a query sees a key of its
    own segment (a pair, or a prompt with its answers; other segments are other pairs of a packed
    row) whose branch is 0 (the shared prompt) or the query's own branch (its own answer)."""
    segment_ids, branch_ids = segments
    seg_q, seg_k = segment_ids[:, q_start:q_end, None], segment_ids[:, None, :k_end]  # (B, Tq, 1), (B, 1, Tk)
    br_q, br_k = branch_ids[:, q_start:q_end, None], branch_ids[:, None, :k_end]
    return ((seg_q == seg_k) & ((br_k == 0) | (br_k == br_q)))[:, None]  # (B, 1, Tq, Tk)


def _sdpa_causal_attention(q, k, v, key, cfg, plan, segments=None):
    """causal_attention by jax.nn.dot_product_attention (no dropout); the segment mask, when
    given, is ANDed with the causal one."""
    T = q.shape[1]
    mask = None if segments is None else segment_visibility(segments, 0, T, T)  # (B, 1, T, T)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True).astype(v.dtype)


def blocked_causal_attention(q, k, v, key, cfg, plan, segments=None):
    """causal_attention in blocks of cfg.attention_block query rows: block [s, e) only meets keys
    [0, e), so the masked part above the diagonal blocks is never computed (at T=512 and blocks of
    128, 62.5% of the full T x T work). Each block's softmax is over all the keys it can see, so this
    is the plain formula, not an online-softmax approximation. Dropout on the probabilities draws
    one mask per block from fold_in(key, block index). The segment mask, when given, is ANDed with
    the causal one inside each block (every query sees at least itself, so no row is empty)."""
    T = q.shape[1]
    q, k, v = (rows_major(x.transpose(0, 2, 1, 3), plan.cpu_layouts) for x in (q, k, v))  # (B, nh, T, hs)
    block = cfg.attention_block or T
    outputs = []
    for i, start in enumerate(range(0, T, block)):
        end = min(start + block, T)
        visible = np.arange(start, end)[:, None] >= np.arange(end)[None, :]  # (end - start, end)
        if segments is not None:
            visible = visible & segment_visibility(segments, start, end, end)  # (B, 1, end - start, end)
        block_key = None if key is None else jax.random.fold_in(key, i)
        q_block, k_seen, v_seen = q[:, :, start:end], k[:, :, :end], v[:, :, :end]
        y = attend(q_block, k_seen, v_seen, visible, cfg.attn_pdrop, block_key, plan.cpu_layouts)
        outputs.append(y)  # (B, nh, end - start, hs)
    return jnp.concatenate(outputs, axis=2).transpose(0, 2, 1, 3)  # (B, T, nh, hs)


def attend(q, k, v, visible, rate: float = 0.0, key=None, cpu_layouts: bool = False):
    """softmax(q k^T / sqrt(d), -inf where not visible) v for q (B, nh, Tq, hs), k, v (B, nh, Tk, hs);
    scores, softmax and accumulation in float32, the result in v's dtype: (B, nh, Tq, hs)."""
    scores = matmul(q, k, True, cpu_layouts) * (1.0 / math.sqrt(q.shape[-1]))  # (B, nh, Tq, Tk)
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    probs = dropout(probs, rate, key)
    return matmul(probs.astype(v.dtype), v, False, cpu_layouts).astype(v.dtype)  # (B, nh, Tq, hs)
