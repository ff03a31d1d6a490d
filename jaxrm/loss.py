"""Pairwise reward-model loss: pure jnp, vectorized over pairs, fixed shapes, jit-friendly.

Default = the original (trlx) span loss: per pair, the mean over t in [div, max(c_end, r_end))
of -logsigmoid(chosen_r[t] - rejected_r[t]); identical pairs add nothing but count in the
denominator; end scores are read at end - 1. Rows: 0..bs-1 chosen, bs..2bs-1 rejected.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrm.config import NORMALIZE_BY, PAIR_LOSSES
from jaxrm.metrics import counted_mean
from jaxrm.tokenizer import first_out_of_range


class PairwiseOutput(NamedTuple):
    loss: jax.Array  # () float32
    chosen_end_scores: jax.Array  # (bs,) reward at the chosen sequence's last real token
    rejected_end_scores: jax.Array  # (bs,) same for rejected (not meaningful where identical)
    identical: jax.Array  # (bs,) bool: chosen == rejected; no loss term
    accuracy: jax.Array  # () fraction of non-identical pairs with chosen > rejected
    per_pair_loss: jax.Array  # (bs,) each pair's loss term (0 for identical pairs)
    centered: jax.Array  # (bs,) (c_end + r_end)^2, 0 for identical pairs (centering term)


def sequence_ends(input_ids, pad_id: int, lengths=None):
    """(B,) end of each row: explicit `lengths`, else the index of the first PAD, else T."""
    if lengths is not None:
        return jnp.asarray(lengths, jnp.int32)
    is_pad = input_ids == pad_id  # (B, T)
    T = input_ids.shape[1]
    return jnp.where(is_pad.any(axis=1), jnp.argmax(is_pad, axis=1), T).astype(jnp.int32)


def _differs(c_ids, r_ids, c_end, r_end, use_lengths: bool):
    """(bs, T) positions where a pair differs: raw ids (the original), or real tokens only with lengths."""
    differs = c_ids != r_ids
    if use_lengths:  # a position inside one side only differs; garbage after both ends does not
        t = jnp.arange(c_ids.shape[1])[None, :]
        c_real, r_real = t < c_end[:, None], t < r_end[:, None]
        differs = (differs & c_real & r_real) | (c_real != r_real)
    return differs


def identical_pairs(input_ids, pad_id: int, lengths=None):
    """(bs,) bool: pairs whose chosen and rejected sequences are the same (no loss term)."""
    bs = input_ids.shape[0] // 2
    ends = sequence_ends(input_ids, pad_id, lengths)
    return ~_differs(input_ids[:bs], input_ids[bs:], ends[:bs], ends[bs:], lengths is not None).any(axis=1)


def _score_at(rewards, index):
    """rewards[i, index[i]]; NaN where index < 0 (an all-padding row), never a wrapped read."""
    safe = jnp.clip(index, 0, rewards.shape[1] - 1)
    scores = jnp.take_along_axis(rewards, safe[:, None], axis=1)[:, 0]  # (bs,)
    return jnp.where(index >= 0, scores, jnp.nan)


def pairwise_loss(
    rewards,
    input_ids,
    pad_id: int,
    return_loss: bool = True,
    *,
    loss_type: str = "span",
    margins=None,
    center_rewards_coef: float = 0.0,
    normalize_by: str = "pairs",
    lengths=None,
) -> PairwiseOutput:
    """Loss and end scores for a pair batch.

    Options (all off by default, i.e. the original):
      loss_type="last_token": Bradley-Terry on end scores, -logsigmoid(c_end - r_end).
      margins (bs,): subtracted inside the logsigmoid, -logsigmoid(c - r - margin) (per token for "span").
      center_rewards_coef: adds coef * mean over non-identical pairs of (c_end + r_end)^2.
      normalize_by="nonidentical": divide by the number of non-identical pairs instead of bs.
      lengths (2bs,): sequence ends from explicit lengths instead of the first PAD.
    Divergence at position 0 gives the span from 0. All-padding rows must be rejected before
    (validate_pair_batch); inside jit they turn the scores and loss into NaN, never a wrong number.
    """
    _check_arguments(rewards, input_ids, loss_type, normalize_by)
    bs = input_ids.shape[0] // 2
    ends = sequence_ends(input_ids, pad_id, lengths)  # (2bs,)
    differs = _differs(input_ids[:bs], input_ids[bs:], ends[:bs], ends[bs:], lengths is not None)  # (bs, T)
    return pairwise_loss_at(
        rewards,
        ends,
        jnp.argmax(differs, axis=1),
        ~differs.any(axis=1),
        return_loss,
        loss_type=loss_type,
        margins=margins,
        center_rewards_coef=center_rewards_coef,
        normalize_by=normalize_by,
    )


def pairwise_loss_at(
    rewards,
    ends,
    div,
    identical,
    return_loss: bool = True,
    *,
    loss_type: str = "span",
    margins=None,
    center_rewards_coef: float = 0.0,
    normalize_by: str = "pairs",
) -> PairwiseOutput:
    """pairwise_loss from the pairs' geometry instead of their ids: rewards (2bs, T) at the padded
    rows' positions, ends (2bs,), div (bs,) the first differing position (0 when identical),
    identical (bs,). Only the span [div, max end) and the end scores are read, so rows built from
    another layout (jaxrm.layouts) may hold anything elsewhere."""
    bs = rewards.shape[0] // 2
    rewards = rewards.astype(jnp.float32)
    c_end, r_end = ends[:bs], ends[bs:]
    c_rewards, r_rewards = rewards[:bs], rewards[bs:]  # (bs, T)
    chosen_end_scores = _score_at(c_rewards, c_end - 1)
    rejected_end_scores = _score_at(r_rewards, r_end - 1)
    margins = jnp.zeros((bs,), jnp.float32) if margins is None else jnp.asarray(margins, jnp.float32)

    if loss_type == "span":
        per_pair = _span_loss(c_rewards, r_rewards, div, jnp.maximum(c_end, r_end), margins)
    else:
        per_pair = -jax.nn.log_sigmoid(chosen_end_scores - rejected_end_scores - margins)
    per_pair = jnp.where(identical, 0.0, per_pair)
    per_pair = jnp.where((c_end > 0) & (r_end > 0), per_pair, jnp.nan)  # an empty row poisons, never hides

    centered = jnp.where(identical, 0.0, (chosen_end_scores + rejected_end_scores) ** 2)
    loss = jnp.float32(0.0)
    if return_loss:
        denominator, num_counted = loss_denominators(identical, normalize_by)
        loss = reduce_loss(per_pair, centered, denominator, num_counted, center_rewards_coef)
    accuracy = counted_mean((chosen_end_scores > rejected_end_scores).astype(jnp.float32), identical)
    return PairwiseOutput(
        loss, chosen_end_scores, rejected_end_scores, identical, accuracy, per_pair, centered
    )


def _check_arguments(rewards, input_ids, loss_type: str, normalize_by: str) -> None:
    if loss_type not in PAIR_LOSSES:
        raise ValueError(f"loss_type must be one of {PAIR_LOSSES}, got {loss_type!r}")
    if normalize_by not in NORMALIZE_BY:
        raise ValueError(f"normalize_by must be one of {NORMALIZE_BY}, got {normalize_by!r}")
    if rewards.shape != input_ids.shape or rewards.ndim != 2:
        raise ValueError(f"rewards {rewards.shape} and input_ids {input_ids.shape} must both be (2*bs, T)")
    if input_ids.shape[0] % 2:
        rows = input_ids.shape[0]
        raise ValueError(f"a pair batch needs an even number of rows (chosen then rejected), got {rows}")


def _span_loss(c_rewards, r_rewards, div, end, margins):
    """(bs,) the original's span loss: the mean of -logsigmoid(c_r[t] - r_r[t] - margin) over
    t in [div (the first differing index), end). An empty span (only possible with malformed rows)
    gives NaN, as the original's mean would."""
    t = jnp.arange(c_rewards.shape[1])[None, :]  # (1, T)
    in_span = (t >= div[:, None]) & (t < end[:, None])  # (bs, T)
    token_loss = -jax.nn.log_sigmoid(c_rewards - r_rewards - margins[:, None])  # (bs, T)
    span_len = in_span.sum(axis=1)
    return jnp.where(in_span, token_loss, 0.0).sum(axis=1) / jnp.where(span_len > 0, span_len, jnp.nan)


def loss_denominators(identical, normalize_by: str):
    """(denominator of the loss terms, number of non-identical pairs, at least 1), float32, of a
    batch's (bs,) identical flags: the denominator is bs with normalize_by="pairs" (the original),
    the number of non-identical pairs with "nonidentical"."""
    num_counted = jnp.maximum((~identical).sum(), 1).astype(jnp.float32)
    return (jnp.float32(identical.shape[0]) if normalize_by == "pairs" else num_counted), num_counted


def reduce_loss(per_pair_loss, centered, denominator, num_counted, center_rewards_coef: float = 0.0):
    """The loss from per-pair terms: their sum / denominator, plus center_rewards_coef times the sum
    of the centering terms / num_counted (loss_denominators). With the denominators of a whole batch
    and the terms of one micro-batch, it gives that micro-batch's exact share of the batch's loss."""
    loss = per_pair_loss.sum() / denominator
    if center_rewards_coef:
        loss = loss + center_rewards_coef * centered.sum() / num_counted
    return loss


class PairBatchError(ValueError):
    pass


def validate_pair_batch(
    input_ids, pad_id: int, vocab_size: int, block_size: int | None = None, lengths=None
) -> None:
    """Host-side checks before the loss: what would otherwise give a wrong number or a NaN."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[0] % 2 or ids.shape[0] == 0:
        raise PairBatchError(f"a pair batch has shape (2*bs, T) with bs >= 1, got {ids.shape}")
    if block_size is not None and ids.shape[1] > block_size:
        raise PairBatchError(f"sequence length {ids.shape[1]} exceeds block_size={block_size}")
    bad = first_out_of_range(ids, vocab_size)
    if bad is not None:
        row, col, token = bad
        raise PairBatchError(f"token id {token} at row {row}, position {col} is outside [0, {vocab_size})")
    ends = np.asarray(sequence_ends(ids, pad_id, lengths))
    if lengths is not None and ((ends < 0) | (ends > ids.shape[1])).any():
        row = int(np.argmax((ends < 0) | (ends > ids.shape[1])))
        raise PairBatchError(f"length {ends[row]} of row {row} is outside [1, {ids.shape[1]}]")
    empty = np.flatnonzero(ends == 0)
    if empty.size:
        raise PairBatchError(
            f"row {empty[0]} is empty (all padding or length 0): it has no last token to score"
        )
    if lengths is not None:  # spans are cut to real tokens: never empty
        return
    bs = ids.shape[0] // 2
    differs = ids[:bs] != ids[bs:]
    div = np.argmax(differs, axis=1)
    end = np.maximum(ends[:bs], ends[bs:])
    empty_span = differs.any(axis=1) & (div >= end)
    if empty_span.any():
        i = int(np.flatnonzero(empty_span)[0])
        raise PairBatchError(
            f"pair {i} first differs at position {div[i]}, after both sequences end "
            f"({end[i]}): the difference is in the padding; its loss span is empty"
        )
