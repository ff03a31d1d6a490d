"""K-wise ranking losses against plain numpy written from the formulas, and the ranking metrics
against scipy (jaxrm/ranking.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrm.ranking import best_of_n, ranking_loss, ranking_metrics

stats = pytest.importorskip("scipy.stats")


def log_sigmoid(x):
    return -np.log1p(np.exp(-x))


def plackett_luce_np(r):
    """-sum_j [r_j - log sum_{l >= j} exp(r_l)] over a list ranked best first (no ties)."""
    return -sum(r[j] - np.log(np.exp(r[j:]).sum()) for j in range(len(r)))


def all_pairs_np(r):
    pairs = [(j, m) for j in range(len(r)) for m in range(j + 1, len(r))]
    return np.mean([-log_sigmoid(r[j] - r[m]) for j, m in pairs])


def padded(lists, K):
    """Lists of scores (best first) -> scores (N, K) with garbage in the empty slots, ranks, valid."""
    scores = np.full((len(lists), K), 1e4, np.float32)
    ranks = np.zeros((len(lists), K), np.int32)
    valid = np.zeros((len(lists), K), bool)
    for i, r in enumerate(lists):
        scores[i, : len(r)], ranks[i, : len(r)], valid[i, : len(r)] = r, np.arange(1, len(r) + 1), True
    return scores, ranks, valid


def test_losses_match_the_formulas_with_k_varying():
    rng = np.random.default_rng(0)
    lists = [rng.normal(size=k).astype(np.float32) for k in (2, 3, 5, 8, 4)]
    scores, ranks, valid = padded(lists, 8)
    pl = np.asarray(ranking_loss(scores, ranks, valid, "plackett_luce"))
    ap = np.asarray(ranking_loss(scores, ranks, valid, "all_pairs"))
    np.testing.assert_allclose(pl, [plackett_luce_np(r.astype(np.float64)) for r in lists], rtol=1e-5)
    np.testing.assert_allclose(ap, [all_pairs_np(r.astype(np.float64)) for r in lists], rtol=1e-5)


def test_k2_is_bradley_terry():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(6, 2)).astype(np.float32)
    ranks, valid = np.tile([1, 2], (6, 1)), np.ones((6, 2), bool)
    expected = -log_sigmoid(scores[:, 0].astype(np.float64) - scores[:, 1])
    for loss_type in ("plackett_luce", "all_pairs"):
        np.testing.assert_allclose(ranking_loss(scores, ranks, valid, loss_type), expected, rtol=1e-6)


def test_ties_are_order_free_and_skipped():
    r = np.array([[2.0, -1.0, 0.5, 0.3]], np.float32)
    ranks = np.array([[1, 2, 2, 3]])  # responses 1 and 2 tied
    valid = np.ones((1, 4), bool)
    swapped_r, swapped_ranks = r[:, [0, 2, 1, 3]], ranks[:, [0, 2, 1, 3]]
    for loss_type in ("plackett_luce", "all_pairs"):
        a = ranking_loss(r, ranks, valid, loss_type)
        np.testing.assert_allclose(a, ranking_loss(swapped_r, swapped_ranks, valid, loss_type), rtol=1e-6)
    # all_pairs: the 5 untied ordered pairs only
    x = r[0].astype(np.float64)
    pairs = [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    expected = np.mean([-log_sigmoid(x[j] - x[m]) for j, m in pairs])
    np.testing.assert_allclose(ranking_loss(r, ranks, valid, "all_pairs"), [expected], rtol=1e-6)
    # plackett_luce (Breslow): each of the tie group shares the denominator over {1, 2, 3}
    lse = lambda idx: np.log(np.exp(x[idx]).sum())
    expected = -(x[0] - lse([0, 1, 2, 3])) - (x[1] - lse([1, 2, 3])) - (x[2] - lse([1, 2, 3]))
    np.testing.assert_allclose(ranking_loss(r, ranks, valid, "plackett_luce"), [expected], rtol=1e-6)
    all_tied = ranking_loss(r, np.ones((1, 4), int), valid, "plackett_luce")
    assert float(all_tied[0]) == 0.0


def test_gradients_are_finite_with_empty_slots():
    scores, ranks, valid = padded([np.array([1.0, 0.0]), np.array([0.5, 0.2, -0.1])], 4)
    for loss_type in ("plackett_luce", "all_pairs"):
        g = jax.grad(lambda s, t=loss_type: ranking_loss(s, ranks, valid, t).sum())(jnp.asarray(scores))
        assert np.isfinite(g).all() and not np.asarray(g)[~valid].any()


def test_ranking_metrics_match_scipy():
    rng = np.random.default_rng(2)
    lists = [rng.normal(size=k) for k in (3, 4, 6, 5)]
    lists[1][3] = lists[1][0]  # a tie in score
    scores, ranks, valid = padded(lists, 6)
    got = ranking_metrics(scores, ranks, valid)
    taus = [stats.kendalltau(r, -np.arange(len(r))).statistic for r in lists]
    rhos = [stats.spearmanr(r, -np.arange(len(r))).statistic for r in lists]
    np.testing.assert_allclose(got["kendall_tau"], np.mean(taus), rtol=1e-6)
    np.testing.assert_allclose(got["spearman_rho"], np.mean(rhos), rtol=1e-6)
    pairs = [(r[j] > r[m]) for r in lists for j in range(len(r)) for m in range(j + 1, len(r))]
    np.testing.assert_allclose(got["pairwise_accuracy"], np.mean(pairs))
    np.testing.assert_allclose(got["top1_accuracy"], np.mean([np.argmax(r) == 0 for r in lists]))
    assert got["prompts"] == 4


def test_best_of_n_rule():
    assert best_of_n(np.array([3.0, 1.0, 2.0])) == 1.0
    assert best_of_n(np.array([3.0, 3.0, 2.0, 3.0])) == pytest.approx(1 / 3)
    assert best_of_n(np.array([1.0, 3.0])) == 0.0
