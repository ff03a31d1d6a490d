"""jaxrm and torchref on one set of weights: rewards, end scores, loss, gradients."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrm import RewardModel, convert, pairwise_loss
from parity_tests.conftest import TINY_GPT2, jax_grads_as_state_dict, mixed_pair_batch

torch = pytest.importorskip("torch")
import torchref  # noqa: E402


def torch_model(config, seed=0):
    torch.manual_seed(seed)
    return torchref.RewardModel(**config.torch_kwargs()).eval()


def both_from_torch(config, seed=0):
    tm = torch_model(config, seed)
    return tm, convert.from_torch_state_dict(config, tm.state_dict())


def both_from_jax(config, seed=0):
    jm = RewardModel(config, rngs=nnx.Rngs(seed))
    tm = torchref.RewardModel(**config.torch_kwargs()).eval()
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in convert.to_torch_state_dict(jm).items()})
    return tm, jm


@pytest.mark.parametrize("make_both", [both_from_torch, both_from_jax], ids=["torch_init", "jax_init"])
def test_per_token_rewards_match(make_both, jax_device):
    tm, jm = make_both(TINY_GPT2)
    ids = mixed_pair_batch()
    expected = torchref.per_token_rewards(tm, torch.from_numpy(ids)).detach().numpy()
    got = np.asarray(jm(jnp.asarray(ids)))
    assert got.dtype == np.float32 and got.shape == ids.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_end_scores_and_loss_match_original(jax_device):
    tm, jm = both_from_torch(TINY_GPT2, seed=1)
    ids = mixed_pair_batch(seed=1)
    c_scores, r_scores, loss = tm(torch.from_numpy(ids), None, None, return_loss=True)
    out = pairwise_loss(jm(jnp.asarray(ids)), jnp.asarray(ids), TINY_GPT2.pad_id)
    identical = np.asarray(out.identical)
    assert identical.tolist() == [False, False, True, False, False, False, True]
    np.testing.assert_allclose(np.asarray(out.chosen_end_scores), [s.item() for s in c_scores], atol=1e-5)
    # the original appends a rejected score only for non-identical pairs
    np.testing.assert_allclose(
        np.asarray(out.rejected_end_scores)[~identical], [s.item() for s in r_scores], atol=1e-5
    )
    np.testing.assert_allclose(float(out.loss), loss.item(), rtol=1e-5, atol=1e-6)


def test_end_scores_match_without_return_loss(jax_device):
    tm, jm = both_from_torch(TINY_GPT2, seed=2)
    ids = mixed_pair_batch(seed=2)
    c_scores, r_scores, loss = tm(torch.from_numpy(ids), None, None, return_loss=False)
    out = pairwise_loss(jm(jnp.asarray(ids)), jnp.asarray(ids), TINY_GPT2.pad_id, return_loss=False)
    assert loss == 0 and float(out.loss) == 0.0
    np.testing.assert_allclose(np.asarray(out.chosen_end_scores), [s.item() for s in c_scores], atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(out.rejected_end_scores)[~np.asarray(out.identical)],
        [s.item() for s in r_scores],
        atol=1e-5,
    )


def test_gradients_match(jax_device):
    tm, jm = both_from_torch(TINY_GPT2, seed=3)
    ids = mixed_pair_batch(seed=3)
    _, _, loss = tm(torch.from_numpy(ids), None, None, return_loss=True)
    loss.backward()
    jax_loss, jax_grads = jax_grads_as_state_dict(jm, jnp.asarray(ids), TINY_GPT2.pad_id)
    np.testing.assert_allclose(jax_loss, loss.item(), rtol=1e-5)
    for name, p in tm.named_parameters():
        expected = p.grad.numpy()
        error = np.linalg.norm(jax_grads[name] - expected)
        # relative 1e-4; the absolute floor is for grads that are exactly 0 in theory (ln_f.bias:
        # a shift of every reward leaves a pairwise loss unchanged)
        assert error <= 1e-4 * np.linalg.norm(expected) + 1e-8, f"{name}: gradient error {error:.2e}"
    # wte rows of tokens not in the batch get no gradient in either
    unused = np.setdiff1d(np.arange(TINY_GPT2.vocab_size), ids)
    assert not jax_grads["wte.weight"][unused].any()


def test_attention_mask_fix_matches_causal_path():
    """Fix 1: an all-True attn_mask ANDed with the causal mask gives the is_causal path's result."""
    tm = torch_model(TINY_GPT2, seed=4)
    ids = torch.from_numpy(mixed_pair_batch(seed=4))
    T = ids.shape[1]
    with torch.no_grad():
        tm.train()  # dropout on: the original's SDPA call with a mask raised here
        tm(ids, None, torch.ones(T, T, dtype=torch.bool), return_loss=True)
        tm.eval()
        plain = torchref.per_token_rewards(tm, ids)
        masked = torchref.per_token_rewards(tm, ids, torch.ones(T, T, dtype=torch.bool))
    torch.testing.assert_close(masked, plain, rtol=0, atol=1e-6)


def test_torch_to_jax_to_torch_round_trip_is_exact():
    tm = torch_model(TINY_GPT2, seed=5)
    sd = tm.state_dict()
    back = convert.to_torch_state_dict(convert.from_torch_state_dict(TINY_GPT2, sd))
    assert list(back) == list(sd)
    for key in sd:
        assert np.array_equal(back[key], sd[key].numpy()), key


def test_init_statistics_match_original():
    config = TINY_GPT2.replace(vocab_size=4096, num_layer=3, d_model=128, dff=512)
    tm = torch_model(config, seed=6)
    jax_sd = convert.to_torch_state_dict(RewardModel(config, rngs=nnx.Rngs(6)))
    for name, p in tm.state_dict().items():
        t, j = p.numpy(), jax_sd[name]
        if name.endswith("bias"):
            assert not t.any() and not j.any(), name
        elif ".ln_" in name or name.startswith("ln_f"):
            assert (t == 1).all() and (j == 1).all(), name
        else:
            expected_std = 0.02 / np.sqrt(2 * config.num_layer) if name.endswith("c_proj.weight") else 0.02
            tolerance = 5 * expected_std / np.sqrt(2 * t.size) + 1e-6
            assert abs(t.std() - expected_std) < tolerance, name  # the test's own reading of the original
            assert abs(j.std() - expected_std) < tolerance, f"{name}: std {j.std():.5f} vs {expected_std:.5f}"
            assert abs(j.mean()) < 5 * expected_std / np.sqrt(t.size), name
