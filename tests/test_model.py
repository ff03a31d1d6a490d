"""jaxrm.RewardModel on its own: jit, causality, dropout, dtypes, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrm import ModelConfig, RewardModel

CONFIG = ModelConfig(vocab_size=97, d_model=32, block_size=16, num_heads=4, dff=64, num_layer=2)


def random_ids(seed, shape=(4, 12), vocab=CONFIG.vocab_size):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab - 1, size=shape), jnp.int32)


def test_jit_and_eager_agree(jax_device):
    model = RewardModel(CONFIG, rngs=nnx.Rngs(0))
    ids = random_ids(0)
    eager = model(ids)
    jitted = nnx.jit(lambda m, x: m(x))(model, ids)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-6)


def test_rewards_are_causal(jax_device):
    model = RewardModel(CONFIG, rngs=nnx.Rngs(1))
    ids = random_ids(1)
    base = np.asarray(model(ids))
    for t in (0, 5, 11):
        changed = ids.at[:, t].set((ids[:, t] + 1) % (CONFIG.vocab_size - 1))
        out = np.asarray(model(changed))
        np.testing.assert_array_equal(out[:, :t], base[:, :t])  # earlier rewards untouched
        assert np.abs(out[:, t] - base[:, t]).max() > 0  # this position sees the change


def test_dropout_is_seeded_and_off_by_default(jax_device):
    config = CONFIG.replace(embed_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1, dropout=0.1)
    model = RewardModel(config, rngs=nnx.Rngs(2))
    ids = random_ids(2)
    run = lambda seed: np.asarray(model(ids, deterministic=False, rngs=nnx.Rngs(dropout=seed)))
    np.testing.assert_array_equal(run(7), run(7))
    assert np.abs(run(7) - run(8)).max() > 1e-4
    assert np.abs(run(7) - np.asarray(model(ids))).max() > 1e-4
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(model(ids, deterministic=True)))
    with pytest.raises(ValueError, match="no rngs"):
        model(ids, deterministic=False)


def test_dropout_draws_are_uniform_unbiased_and_keyed():
    from jaxrm.kernels import dropout, dropout_bits

    key = jax.random.key(5)
    bits = np.asarray(dropout_bits(key, (64, 1024)))
    for b in (0, 8, 16, 31):  # every bit is a fair coin
        assert abs(((bits >> b) & 1).mean() - 0.5) < 0.01
    neighbours = np.corrcoef(bits[:, :-1].ravel().astype(np.float64), bits[:, 1:].ravel().astype(np.float64))[
        0, 1
    ]
    assert abs(neighbours) < 0.01
    other = np.asarray(dropout_bits(jax.random.key(6), (64, 1024)))
    assert (bits == other).mean() < 0.001
    kept = np.asarray(dropout(jnp.ones((256, 1024)), 0.1, key))
    assert abs((kept > 0).mean() - 0.9) < 0.003
    assert abs(kept.mean() - 1.0) < 0.005  # inverted dropout keeps the expectation
    assert set(np.unique(kept)) == {0.0, np.float32(1 / 0.9)}


def test_bfloat16_matmuls_keep_float32_params_and_rewards():
    model = RewardModel(CONFIG.replace(dtype="bfloat16"), rngs=nnx.Rngs(3))
    full = RewardModel(CONFIG, rngs=nnx.Rngs(3))
    ids = random_ids(3)
    rewards = model(ids)
    assert rewards.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    diff = np.abs(np.asarray(rewards) - np.asarray(full(ids))).max()
    assert 0 < diff < 0.05  # really computed in bf16, and close


@pytest.mark.parametrize("transpose_b", [False, True], ids=["a@b", "a@bT"])
@pytest.mark.parametrize("batch", [(), (2, 3)], ids=["2d", "batched"])
def test_bfloat16_matmul_gradient_is_the_float32_one_to_bf16_precision(transpose_b, batch):
    from jaxrm.kernels import matmul

    ka, kb, kg = jax.random.split(jax.random.key(0), 3)
    a = jax.random.normal(ka, (*batch, 40, 24))
    b = jax.random.normal(kb, (*batch, 56, 24) if transpose_b else (*batch, 24, 56))
    g = jax.random.normal(kg, (*batch, 40, 56))

    def grads(dtype):
        loss = lambda a, b: jnp.sum(matmul(a.astype(dtype), b.astype(dtype), transpose_b) * g)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(a, b)

    for low, exact in zip(grads(jnp.bfloat16), grads(jnp.float32)):
        assert low.shape == exact.shape and low.dtype == jnp.float32
        err = float(jnp.abs(low - exact).max() / jnp.abs(exact).max())
        assert 1e-4 < err < 2e-2, err  # rounded through bf16 (inputs and cotangent), nothing worse


def test_bfloat16_backward_matmuls_run_in_bfloat16():
    """Like torch autocast: the cotangent enters both backward matmuls in bf16 (plain autodiff of
    a dot with a float32 result would run them in float32, ~2x slower on CPU)."""
    model = RewardModel(CONFIG.replace(dtype="bfloat16"), rngs=nnx.Rngs(3))
    graphdef, params = nnx.split(model, nnx.Param)
    ids = random_ids(3)
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: nnx.merge(graphdef, p)(ids).sum()))(params)

    def dots(jaxpr):  # every dot_general, including those inside scans, remats and custom VJPs
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                yield eqn
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else (param,):
                    sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                    if hasattr(sub, "eqns"):
                        yield from dots(sub)

    operand_dtypes = [tuple(str(v.aval.dtype) for v in eqn.invars) for eqn in dots(jaxpr.jaxpr)]
    big = [d for d in operand_dtypes if d != ("float32", "float32")]
    # per layer 4 linears x 3 matmuls + 2 attention matmuls x 3; only the reward head is float32
    assert len(big) == CONFIG.num_layer * (4 * 3 + 2 * 3), operand_dtypes
    assert all(d == ("bfloat16", "bfloat16") for d in big), operand_dtypes


def test_tanh_gelu_option_changes_the_function():
    exact = RewardModel(CONFIG, rngs=nnx.Rngs(4))
    tanh = RewardModel(CONFIG.replace(activation="gelu_tanh"), rngs=nnx.Rngs(4))
    ids = random_ids(4)
    diff = np.abs(np.asarray(exact(ids)) - np.asarray(tanh(ids))).max()
    assert 0 < diff < 1e-3


@pytest.mark.parametrize("bad", [-1, CONFIG.vocab_size, CONFIG.vocab_size + 100])
def test_out_of_range_ids_are_refused(bad):
    model = RewardModel(CONFIG, rngs=nnx.Rngs(0))
    ids = random_ids(5).at[2, 7].set(bad)
    with pytest.raises(ValueError, match=rf"token id {bad} at row 2, position 7"):
        model(ids)


def test_out_of_range_ids_under_jit_give_nan_not_a_clamp():
    model = RewardModel(CONFIG, rngs=nnx.Rngs(0))
    ids = random_ids(6).at[1, 3].set(CONFIG.vocab_size)
    rewards = np.asarray(nnx.jit(lambda m, x: m(x))(model, ids))
    assert np.isnan(rewards[1, 3:]).all()  # the bad token and everything that attends to it
    assert np.isfinite(rewards[[0, 2, 3]]).all()


def test_too_long_and_malformed_inputs_are_refused():
    model = RewardModel(CONFIG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="exceeds block_size=16"):
        model(random_ids(7, shape=(2, 17)))
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):
        model(jnp.zeros((8,), jnp.int32))
    with pytest.raises(ValueError, match="integers"):
        model(jnp.zeros((2, 4), jnp.float32))


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("num_heads", 5, "not divisible"),
        ("d_model", 0, "positive int"),
        ("dropout", 1.5, r"\[0, 1\)"),
        ("activation", "relu", "activation"),
        ("dtype", "float16", "dtype"),
    ],
)
def test_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        CONFIG.replace(**{field: value})


@pytest.mark.parametrize(
    "config",
    [CONFIG, CONFIG.replace(num_layer=1), CONFIG.replace(dtype="bfloat16")],
    ids=["2-layer", "1-layer", "bf16"],
)
def test_scores_at_equals_the_full_forward_at_those_positions(config):
    model = RewardModel(config, rngs=nnx.Rngs(4))
    ids = random_ids(4, shape=(5, 12))
    positions = jnp.asarray([0, 3, 11, -1, 12], jnp.int32)
    full = np.asarray(model(ids))
    got = np.asarray(nnx.jit(lambda m, x, p: m.scores_at(x, p))(model, ids, positions))
    np.testing.assert_allclose(
        got[:3], full[[0, 1, 2], [0, 3, 11]], atol=1e-5 if config.dtype == "float32" else 2e-2
    )
    assert np.isnan(got[3:]).all()  # -1 and T: NaN, never a wrapped or clamped read
