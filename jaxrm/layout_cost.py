"""Is a batch's shared / packed layout cheaper to run than its rows? (TrainConfig.layout; numpy only)

A layout stores fewer tokens than the 2B padded rows (each prompt once, no padding to the longest
pair), but its rows are longer, and attention work grows with the square of a row's length. On
answer-heavy data (short prompts, long answers) a row [prefix][chosen][rejected] can cost more than
the two padded rows it replaces: the blocked attention skips only the blocks above the diagonal,
so it computes the rejected answer's queries against the chosen answer's keys, which the segment
mask then hides. The steps (jaxrm.step) run such a batch in `rows` instead.

The estimate, per layer (the layer count and what is outside the layers are nearly the same on
both sides), in FLOPs of matmul work for R rows of L tokens:
    R * L * (8 d^2 + 4 d dff)                     qkv, attention projection and MLP matmuls
  + R * area(L) * (4 d + SOFTMAX_FLOPS * heads)   attention: q k^T and p v, plus the per-score work
where area(L) counts the query-key pairs the attention kernel computes (attention_area).
"""

from __future__ import annotations

from jaxrm.config import ModelConfig

# The per-score, per-head work outside the two attention matmuls (scale, mask, softmax, dropout,
# forward and backward), in FLOPs of matmul work: fitted to forward + backward times of the layouts
# benchmark's model (d 128, 4 heads, dff 512, float32, XLA:CPU) at 12 shapes from 2 x 1024 to 64 x 96
# tokens, where a query-key pair cost as much as ~1/200 of a token's matmuls (1,900 FLOPs: 512 of
# matmul, the rest elementwise, which runs far below the matmul rate).
SOFTMAX_FLOPS = 350


def attention_area(L: int, block: int, sdpa: bool) -> int:
    """Query-key pairs the attention computes for one row of L tokens. The blocked kernel
    (kernels.blocked_causal_attention) runs each block [s, e) of `block` query rows (0: one block)
    against keys [0, e), skipping only the blocks above the diagonal; jax.nn.dot_product_attention
    (sdpa; its default XLA implementation) computes all L x L scores and masks them."""
    if sdpa:
        return L * L
    block = block or L
    return sum((min(start + block, L) - start) * min(start + block, L) for start in range(0, L, block))


def model_cost(rows: int, length: int, cfg: ModelConfig, sdpa: bool) -> float:
    """Estimated work of one layer, forward or backward alike, on `rows` rows of `length` tokens
    (module docstring), in matmul FLOPs."""
    d = cfg.d_model
    per_token = 8 * d * d + 4 * d * cfg.dff
    per_score = 4 * d + SOFTMAX_FLOPS * cfg.num_heads
    return rows * (length * per_token + attention_area(length, cfg.attention_block, sdpa) * per_score)


def layout_is_cheaper(rows_shape: tuple, layout_shape: tuple, cfg: ModelConfig, sdpa: bool) -> bool:
    """Whether the layout's rows (R, L) cost less than the padded rows (2B, T) they replace."""
    return model_cost(*layout_shape, cfg, sdpa) < model_cost(*rows_shape, cfg, sdpa)
