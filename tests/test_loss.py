"""pairwise_loss against plain-numpy references written from each definition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrm import PairBatchError, pairwise_loss, validate_pair_batch

PAD = 49
T = 12


def logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def make_batch(seed=0, bs=6):
    """Pairs of mixed lengths and divergence points (including 0), one identical pair."""
    rng = np.random.default_rng(seed)
    chosen, rejected = [], []
    for i in range(bs):
        c_len, r_len = rng.integers(2, T + 1, size=2)
        c = np.full(T, PAD)
        r = np.full(T, PAD)
        c[:c_len] = rng.integers(0, PAD, size=c_len)
        r[:r_len] = rng.integers(0, PAD, size=r_len)
        shared = rng.integers(0, min(c_len, r_len))  # 0 => divergence at position 0
        r[:shared] = c[:shared]
        if i == 2:
            r = c.copy()
        chosen.append(c)
        rejected.append(r)
    ids = np.concatenate([chosen, rejected])  # (2*bs, T)
    rewards = rng.normal(size=ids.shape).astype(np.float32)
    return ids, rewards


def ends_of(ids):
    return np.array([np.flatnonzero(row == PAD)[0] if (row == PAD).any() else T for row in ids])


def reference(ids, rewards, loss_type="span", margins=None, center=0.0, normalize_by="pairs", lengths=None):
    """One pair at a time, from the definitions in loss.py's docstring."""
    bs = len(ids) // 2
    ends = ends_of(ids) if lengths is None else np.asarray(lengths)
    margins = np.zeros(bs) if margins is None else margins
    terms, centered, counted, c_scores, r_scores = [], [], 0, [], []
    for i in range(bs):
        c, r = ids[i][: ends[i]], ids[bs + i][: ends[bs + i]]
        cr, rr = rewards[i], rewards[bs + i]
        c_end, r_end = cr[ends[i] - 1], rr[ends[bs + i] - 1]
        c_scores.append(c_end)
        r_scores.append(r_end)
        same = np.array_equal(ids[i], ids[bs + i]) if lengths is None else np.array_equal(c, r)
        if same:
            continue
        counted += 1
        if loss_type == "span":
            if lengths is None:
                div = np.flatnonzero(ids[i] != ids[bs + i])[0]
            else:
                n = min(len(c), len(r))
                diff = np.flatnonzero(c[:n] != r[:n])
                div = diff[0] if len(diff) else n
            end = max(ends[i], ends[bs + i])
            terms.append(-logsigmoid(cr[div:end] - rr[div:end] - margins[i]).mean())
        else:
            terms.append(-logsigmoid(c_end - r_end - margins[i]))
        centered.append((c_end + r_end) ** 2)
    denominator = bs if normalize_by == "pairs" else max(counted, 1)
    loss = sum(terms) / denominator + (center * np.mean(centered) if centered else 0.0)
    return loss, np.array(c_scores), np.array(r_scores)


def run(ids, rewards, **options):
    return jax.jit(lambda r, i: pairwise_loss(r, i, PAD, **options))(jnp.asarray(rewards), jnp.asarray(ids))


@pytest.mark.parametrize("seed", range(4))
def test_default_is_the_original_span_loss(seed, jax_device):
    ids, rewards = make_batch(seed)
    out = run(ids, rewards)
    loss, c_scores, r_scores = reference(ids, rewards)
    np.testing.assert_allclose(float(out.loss), loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out.chosen_end_scores), c_scores, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out.rejected_end_scores), r_scores, rtol=1e-6)
    assert np.asarray(out.identical).tolist() == [i == 2 for i in range(6)]
    assert np.asarray(out.per_pair_loss)[2] == 0.0


def test_last_token_bradley_terry():
    ids, rewards = make_batch(10)
    out = run(ids, rewards, loss_type="last_token")
    np.testing.assert_allclose(float(out.loss), reference(ids, rewards, loss_type="last_token")[0], rtol=1e-5)


@pytest.mark.parametrize("loss_type", ["span", "last_token"])
def test_per_pair_margin(loss_type):
    ids, rewards = make_batch(11)
    margins = np.random.default_rng(0).uniform(0, 2, size=6).astype(np.float32)
    out = run(ids, rewards, loss_type=loss_type, margins=margins)
    expected = reference(ids, rewards, loss_type=loss_type, margins=margins)[0]
    np.testing.assert_allclose(float(out.loss), expected, rtol=1e-5)
    assert float(out.loss) > float(run(ids, rewards, loss_type=loss_type).loss)


def test_reward_centering():
    ids, rewards = make_batch(12)
    out = run(ids, rewards, center_rewards_coef=0.01)
    np.testing.assert_allclose(float(out.loss), reference(ids, rewards, center=0.01)[0], rtol=1e-5)


def test_normalize_by_nonidentical_pairs():
    ids, rewards = make_batch(13)
    out = run(ids, rewards, normalize_by="nonidentical")
    expected = reference(ids, rewards, normalize_by="nonidentical")[0]
    np.testing.assert_allclose(float(out.loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(out.loss), float(run(ids, rewards).loss) * 6 / 5, rtol=1e-5)


def test_explicit_lengths_let_pad_appear_inside_text():
    """With lengths, a PAD (= end-of-text) inside a prompt does not cut the sequence."""
    ids, rewards = make_batch(14)
    bs = 6
    lengths = ends_of(ids)
    ids[0, 0] = PAD  # an end-of-text token inside chosen 0's text
    ids[bs + 0, 0] = PAD  # and the same in its rejected (a shared prompt)
    out = run(ids, rewards, lengths=jnp.asarray(lengths))
    loss, c_scores, r_scores = reference(ids, rewards, lengths=lengths)
    np.testing.assert_allclose(float(out.loss), loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out.chosen_end_scores), c_scores, rtol=1e-6)


def test_explicit_lengths_ignore_garbage_after_the_end():
    ids, rewards = make_batch(15)
    lengths = ends_of(ids)
    noisy = ids.copy()
    rng = np.random.default_rng(0)
    for row, n in enumerate(lengths):
        noisy[row, n:] = rng.integers(0, PAD, size=T - n)
    a = run(ids, rewards, lengths=jnp.asarray(lengths))
    b = run(noisy, rewards, lengths=jnp.asarray(lengths))
    np.testing.assert_allclose(float(a.loss), float(b.loss), rtol=1e-6)
    assert np.asarray(b.identical).tolist() == np.asarray(a.identical).tolist()


def test_accuracy_counts_only_nonidentical_pairs():
    ids, rewards = make_batch(16)
    out = run(ids, rewards)
    _, c_scores, r_scores = reference(ids, rewards)
    keep = np.arange(6) != 2
    np.testing.assert_allclose(float(out.accuracy), np.mean(c_scores[keep] > r_scores[keep]))


def test_divergence_at_position_zero_spans_from_zero():
    ids = np.full((2, T), PAD)
    ids[0, :4] = [1, 2, 3, 4]
    ids[1, :3] = [5, 2, 3]
    rewards = np.random.default_rng(0).normal(size=ids.shape).astype(np.float32)
    out = run(ids, rewards)
    expected = -logsigmoid(rewards[0, :4] - rewards[1, :4]).mean()
    np.testing.assert_allclose(float(out.loss), expected, rtol=1e-6)


def test_all_padding_row_is_rejected_and_never_read_at_minus_one():
    ids, rewards = make_batch(17)
    ids[1, :] = PAD
    with pytest.raises(PairBatchError, match="row 1 is empty"):
        validate_pair_batch(ids, PAD, vocab_size=PAD + 1)
    out = run(ids, rewards)  # inside jit: NaN, not rewards[1, -1]
    assert np.isnan(np.asarray(out.chosen_end_scores)[1]) and np.isnan(float(out.loss))
    assert np.isfinite(np.asarray(out.chosen_end_scores)[[0, 2, 3, 4, 5]]).all()


def test_validation_errors_are_specific():
    ids, _ = make_batch(18)
    validate_pair_batch(ids, PAD, vocab_size=PAD + 1, block_size=T)  # a good batch passes
    with pytest.raises(PairBatchError, match="even|bs >= 1"):
        validate_pair_batch(ids[:5], PAD, vocab_size=PAD + 1)
    with pytest.raises(PairBatchError, match="token id 50 at row 3, position 0"):
        bad = ids.copy()
        bad[3, 0] = 50
        validate_pair_batch(bad, PAD, vocab_size=PAD + 1)
    with pytest.raises(PairBatchError, match="exceeds block_size=8"):
        validate_pair_batch(ids, PAD, vocab_size=PAD + 1, block_size=8)
    bad = np.full((2, T), PAD)
    bad[:, :3] = [1, 2, 3]
    bad[1, 5] = 7  # differs only after both ends: an empty span
    with pytest.raises(PairBatchError, match="pair 0 first differs at position 5"):
        validate_pair_batch(bad, PAD, vocab_size=PAD + 1)


def test_odd_rows_and_bad_options_raise():
    ids, rewards = make_batch(19)
    with pytest.raises(ValueError, match="even number of rows"):
        pairwise_loss(jnp.asarray(rewards[:5]), jnp.asarray(ids[:5]), PAD)
    with pytest.raises(ValueError, match="loss_type"):
        pairwise_loss(jnp.asarray(rewards), jnp.asarray(ids), PAD, loss_type="hinge")
    with pytest.raises(ValueError, match="normalize_by"):
        pairwise_loss(jnp.asarray(rewards), jnp.asarray(ids), PAD, normalize_by="tokens")


def test_loss_is_jit_compatible_with_fixed_shapes():
    ids, rewards = make_batch(20)
    shapes = jax.eval_shape(lambda r, i: pairwise_loss(r, i, PAD), jnp.asarray(rewards), jnp.asarray(ids))
    assert shapes.loss.shape == () and shapes.chosen_end_scores.shape == (6,)
    assert shapes.identical.dtype == jnp.bool_
