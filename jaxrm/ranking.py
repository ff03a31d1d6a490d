"""K-wise rankings: losses on the end scores of a prompt's K >= 2 responses, and their eval
metrics. Pure jnp (losses, under jit) and numpy (metrics, on the host).

Layout: scores (N, K) float32, ranks (N, K) int32 (1 = best; equal ranks are ties), valid (N, K)
bool (K varies from prompt to prompt: slots past a prompt's last response are False).

Ties are never ordered at random; they carry no preference between the tied responses:
- all_pairs skips the tied pairs (only pairs with rank_j < rank_l count);
- plackett_luce gives each response of a tie group the same denominator, the logsumexp over every
  response ranked as good or worse (the tie group included: Breslow's rule, independent of the
  order the tied responses are listed in), and the worst group's terms are left out (they
  prefer nothing). Without ties this is the listwise likelihood
  -sum_j [r_j - logsumexp(r_j..r_K)], and with K = 2 both are the Bradley-Terry loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxrm.config import RANKING_LOSSES

_NEG = -1e30  # "not in the sum" for logsumexp: finite, so the gradient stays finite


def better_pairs(ranks, valid):
    """(N, K, K) bool: response j is strictly better ranked than response l (both real)."""
    both = valid[:, :, None] & valid[:, None, :]
    return (ranks[:, :, None] < ranks[:, None, :]) & both


def ranking_loss(scores, ranks, valid, loss_type: str = "plackett_luce"):
    """(N,) each prompt's loss (module docstring): plackett_luce (a sum over the ranked list) or
    all_pairs (the mean Bradley-Terry loss over its ordered pairs, as Open-Assistant trains). A
    prompt without any ordered pair (all tied) gives 0."""
    if loss_type not in RANKING_LOSSES:
        raise ValueError(f"loss_type must be one of {RANKING_LOSSES}, got {loss_type!r}")
    s = jnp.asarray(scores, jnp.float32)
    ranks, valid = jnp.asarray(ranks), jnp.asarray(valid, bool)
    better = better_pairs(ranks, valid)  # (N, K, K)
    if loss_type == "all_pairs":
        terms = -jax.nn.log_sigmoid(s[:, :, None] - s[:, None, :])  # (N, K, K)
        return jnp.where(better, terms, 0.0).sum((1, 2)) / jnp.maximum(better.sum((1, 2)), 1)
    as_good_or_worse = (ranks[:, None, :] >= ranks[:, :, None]) & valid[:, None, :]  # (N, j, l)
    # logsumexp_l(r_l) - r_j as logsumexp_l(r_l - r_j): a function of score differences only, so
    # a shift of every score (e.g. the head's bias) gets a gradient of exactly 0, as for pairs
    lse = jax.nn.logsumexp(jnp.where(as_good_or_worse, s[:, None, :] - s[:, :, None], _NEG), axis=2)
    counted = better.any(axis=2)  # j is preferred to someone: not in the worst group
    return jnp.where(counted, lse, 0.0).sum(axis=1)  # (N,)


# ----------------------------------------------------------------------------- eval metrics


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x ascending, ties sharing their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def _kendall_tau_b(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b of two sequences (NaN when either is constant)."""
    da = np.sign(a[:, None] - a[None, :])
    db = np.sign(b[:, None] - b[None, :])
    upper = np.triu(np.ones_like(da, dtype=bool), 1)
    na, nb = (da[upper] != 0).sum(), (db[upper] != 0).sum()
    return float((da * db)[upper].sum() / np.sqrt(na * nb)) if na and nb else float("nan")


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denominator) if denominator else float("nan")


def best_of_n(scores: np.ndarray) -> float:
    """RewardBench 2's rule for responses listed best first: 1 / (number tied at the maximum)
    when the first response has the maximum score, else 0."""
    top = scores.max()
    return 1.0 / float((scores == top).sum()) if scores[0] == top else 0.0


def ranking_metrics(scores, ranks, valid) -> dict:
    """Per-prompt metrics, averaged over prompts (numpy): pairwise accuracy over all ordered pairs
    (a tie in score counts as wrong), top-1 accuracy (the highest score, first on ties in score, is
    a best-ranked response), Kendall tau-b and Spearman rho between the scores and the preference
    (-rank; prompts where either is constant are left out of that mean), and RewardBench 2's
    best_of_n on the responses in rank order (best_of_n)."""
    scores, ranks, valid = np.asarray(scores, np.float64), np.asarray(ranks), np.asarray(valid, bool)
    better = np.asarray(better_pairs(ranks, valid))
    correct = scores[:, :, None] > scores[:, None, :]
    out = {"pairwise_accuracy": float((better & correct).sum() / max(better.sum(), 1))}
    top1, taus, rhos, bon = [], [], [], []
    for s, r, v in zip(scores, ranks, valid, strict=True):
        s, r = s[v], r[v]
        top1.append(float(r[np.argmax(s)] == r.min()))
        taus.append(_kendall_tau_b(s, -r.astype(np.float64)))
        rhos.append(_spearman(s, -r.astype(np.float64)))
        bon.append(best_of_n(s[np.argsort(r, kind="stable")]))
    mean = lambda xs: float(np.nanmean(xs)) if not np.isnan(xs).all() else float("nan")
    out.update(top1_accuracy=mean(top1), kendall_tau=mean(taus), spearman_rho=mean(rhos), best_of_n=mean(bon))
    return {**out, "prompts": len(scores)}
