"""The model's execution strategies (layer scan, recomputation) compute the same function."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxrm.model as M
from jaxrm import ModelConfig, RewardModel, pairwise_loss

CONFIG = ModelConfig(vocab_size=97, d_model=32, block_size=16, num_heads=4, dff=64, num_layer=3)
PLANS = [("0", "none"), ("1", "none"), ("1", "attention"), ("1", "block"), ("0", "block")]


def run(plan, dropout_seed=None, monkeypatch=None):
    monkeypatch.setattr(M, "SCAN_LAYERS", plan[0])
    monkeypatch.setattr(M, "REMAT", plan[1])
    model = RewardModel(CONFIG, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size - 1, size=(4, 12)), jnp.int32)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        det = dropout_seed is None
        rewards = nnx.merge(graphdef, p)(ids, deterministic=det, rngs=None if det else nnx.Rngs(dropout=dropout_seed))
        return pairwise_loss(rewards, ids, CONFIG.pad_id).loss, rewards

    (value, rewards), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(rewards), float(value), [np.asarray(g) for g in jax.tree.leaves(grads)]


@pytest.mark.parametrize("dropout_seed", [None, 3])
@pytest.mark.parametrize("plan", PLANS[1:], ids=lambda p: f"scan{p[0]}-{p[1]}")
def test_plans_agree(plan, dropout_seed, monkeypatch):
    ref = run(PLANS[0], dropout_seed, monkeypatch)
    got = run(plan, dropout_seed, monkeypatch)
    np.testing.assert_allclose(got[0], ref[0], atol=1e-5)
    np.testing.assert_allclose(got[1], ref[1], atol=1e-6)
    for g, r in zip(got[2], ref[2]):
        np.testing.assert_allclose(g, r, atol=1e-5)


def test_auto_plan_recomputes_only_when_large():
    assert M.execution_plan(CONFIG, 4, 12) == (False, "none")
    gpt2 = ModelConfig()
    big = M.stored_activation_bytes(gpt2, 64, 1024)
    assert big > 0.15 * M._physical_memory()
    assert M.execution_plan(gpt2, 64, 1024) == (True, "block")


def test_sdpa_attention_matches_einsum(monkeypatch):
    monkeypatch.setattr(M, "ATTENTION", "einsum")
    ref = run(PLANS[0], None, monkeypatch)
    monkeypatch.setattr(M, "ATTENTION", "sdpa")
    got = run(PLANS[0], None, monkeypatch)
    np.testing.assert_allclose(got[0], ref[0], atol=1e-5)
    for g, r in zip(got[2], ref[2]):
        np.testing.assert_allclose(g, r, atol=1e-5)
