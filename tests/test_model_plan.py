"""The model's execution plans (layer scan, recomputation, attention formulation) compute the same
function, and are chosen from the devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrm import ModelConfig, RewardModel, kernels, pairwise_loss
from jaxrm.plan import devices_of, execution_plan, host_memory, stored_activation_bytes

CONFIG = ModelConfig(
    vocab_size=97, d_model=32, block_size=16, num_heads=4, dff=64, num_layer=2, attention_block=4
)
PLANS = [("off", "none"), ("on", "none"), ("on", "attention"), ("on", "block"), ("off", "block")]


@functools.cache
def run(config, dropout_seed=None):
    model = RewardModel(config, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size - 1, size=(4, 12)), jnp.int32)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        det = dropout_seed is None
        rewards = nnx.merge(graphdef, p)(
            ids, deterministic=det, rngs=None if det else nnx.Rngs(dropout=dropout_seed)
        )
        return pairwise_loss(rewards, ids, config.pad_id).loss, rewards

    (value, rewards), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(rewards), float(value), [np.asarray(g) for g in jax.tree.leaves(grads)]


def assert_same(got, ref):
    np.testing.assert_allclose(got[0], ref[0], atol=1e-5)
    np.testing.assert_allclose(got[1], ref[1], atol=1e-6)
    for g, r in zip(got[2], ref[2]):
        np.testing.assert_allclose(g, r, atol=1e-5)


@pytest.mark.parametrize("dropout_seed", [None, 3])
@pytest.mark.parametrize("plan", PLANS[1:], ids=lambda p: f"scan_{p[0]}-{p[1]}")
def test_plans_agree(plan, dropout_seed):
    ref = run(CONFIG.replace(scan_layers=PLANS[0][0], remat=PLANS[0][1]), dropout_seed)
    got = run(CONFIG.replace(scan_layers=plan[0], remat=plan[1]), dropout_seed)
    assert_same(got, ref)


def test_dropout_changes_the_function():  # so that test_plans_agree's dropout case can fail
    assert not np.allclose(run(CONFIG, 3)[0], run(CONFIG, None)[0], atol=1e-3)


@pytest.mark.parametrize("block", [1, 5, 64])
def test_attention_blocks_agree_with_one_block(block):
    """Query blocks of any size (dividing T=12 or not) give the full-matrix attention."""
    assert_same(
        run(CONFIG.replace(attention="blocked", attention_block=block)),
        run(CONFIG.replace(attention="blocked", attention_block=0)),
    )


def test_sdpa_attention_matches_blocked():
    assert_same(run(CONFIG.replace(attention="sdpa")), run(CONFIG.replace(attention="blocked")))


def test_blocked_attention_is_causal_softmax():
    """Against a plain numpy causal attention, at a T that the blocks do not divide."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 11, 3, 8)).astype(np.float32) for _ in range(3))
    config = CONFIG.replace(attention="blocked", attention_block=4)
    got = np.asarray(kernels.causal_attention(q, k, v, None, config, execution_plan(config, 2, 11)))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
    scores = np.where(np.tril(np.ones((11, 11), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, np.einsum("bhqk,bkhd->bqhd", probs, v), atol=1e-5)


def test_auto_plan_recomputes_only_when_large():
    def plan(config, B, T):
        chosen = execution_plan(config, B, T, jax.devices("cpu"))
        return chosen.scan_layers, chosen.remat

    assert plan(CONFIG, 4, 12) == (False, "none")
    gpt2 = ModelConfig()
    big = stored_activation_bytes(gpt2, 64, 1024)
    assert big > 0.15 * host_memory()
    assert plan(gpt2, 64, 1024) == (True, "block")
    assert plan(gpt2.replace(remat="none"), 64, 1024) == (False, "none")
    assert plan(gpt2.replace(remat="none", scan_layers="on"), 64, 1024) == (True, "none")


def test_bad_plan_values_are_named():
    with pytest.raises(ValueError, match="remat"):
        ModelConfig(remat="sometimes")
    with pytest.raises(ValueError, match="attention_block"):
        ModelConfig(attention_block=-1)


class FakeAccelerator:
    """Stands in for a GPU in the plan's decision (only .platform and .memory_stats() are read)."""

    platform = "gpu"

    def __init__(self, bytes_limit):
        self.bytes_limit = bytes_limit

    def memory_stats(self):
        return {"bytes_limit": self.bytes_limit}


def test_plan_follows_the_devices_not_the_host():
    cpu = execution_plan(CONFIG, 4, 12, jax.devices("cpu"))
    assert (cpu.attention, cpu.cpu_layouts) == ("blocked", True)
    gpu = execution_plan(CONFIG, 4, 12, [FakeAccelerator(80 * 2**30)])
    assert (gpu.attention, gpu.cpu_layouts, gpu.remat, gpu.scan_layers) == ("sdpa", False, "none", False)
    assert (
        execution_plan(CONFIG.replace(attention="blocked"), 4, 12, [FakeAccelerator(80 * 2**30)]).attention
        == "blocked"
    )
    gpt2 = ModelConfig()
    need = stored_activation_bytes(gpt2, 64, 1024)
    small = [FakeAccelerator(int(need / 0.15 / 4) - 1)] * 4  # together just too small: recompute
    assert execution_plan(gpt2, 64, 1024, small).remat == "block"
    large = [FakeAccelerator(int(need / 0.15 / 4) + 2**20)] * 4  # spread over 4 devices it fits
    assert execution_plan(gpt2, 64, 1024, large).remat == "none"


def test_the_model_takes_its_plan_from_the_ids_device():
    model = RewardModel(CONFIG, rngs=nnx.Rngs(0))
    ids = jax.device_put(
        jnp.asarray(np.random.default_rng(0).integers(0, 96, size=(2, 8)), jnp.int32), jax.devices("cpu")[0]
    )
    assert devices_of(ids) == {jax.devices("cpu")[0]} and devices_of(np.asarray(ids)) is None
    explicit = model(ids, plan=execution_plan(CONFIG.replace(scan_layers="on"), 2, 8, jax.devices("cpu")))
    np.testing.assert_allclose(np.asarray(explicit), np.asarray(model(ids)), atol=1e-6)
