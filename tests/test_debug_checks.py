"""Debug mode (issue 7): TrainConfig.debug_checks runs the train step under checkify (index, NaN,
division checks) or jax_debug_nans. A normal step is unchanged; a batch with an out-of-range token
id (which the model otherwise turns into NaN under jit) stops with a TrainingError naming the step
and the fault."""

import jax
import numpy as np
import pytest

from jaxrm import cli
from jaxrm.config import ModelConfig, TrainConfig
from jaxrm.loop import TrainingError
from jaxrm.sharding import shard_batch
from jaxrm.state import init_train_state
from jaxrm.step import make_train_step

MODEL = ModelConfig(vocab_size=257, d_model=32, block_size=16, num_heads=4, dff=64, num_layer=1)  # dropout on


def batch(out_of_range: bool = False) -> dict:
    ids = np.full((4, 8), MODEL.pad_id, np.int32)
    ids[:, :3] = [[1, 2, 3], [1, 2, 4], [1, 5, 6], [1, 5, 7]]
    if out_of_range:
        ids[0, 1] = MODEL.vocab_size + 5
    return shard_batch({"input_ids": ids, "margins": np.zeros(2, np.float32)}, None, 2)  # (2, 2, 8)


def config(debug_checks: str) -> TrainConfig:
    return TrainConfig(batch_size=2, max_steps=4, warmup_steps=1, debug_checks=debug_checks)


@pytest.fixture(scope="module")
def plain_run():
    """Two normal steps without debug checks: (step function, losses, params)."""
    step, state, losses = make_train_step(MODEL, config("off")), init_train_state(MODEL, config("off")), []
    for _ in range(2):
        state, metrics = step(state, batch())
        losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    return step, losses, jax.tree.map(np.asarray, state.params)


@pytest.mark.parametrize("mode", ["checkify", "nans"])
def test_debug_checks_leave_a_normal_step_unchanged_and_name_the_faulty_step(mode, plain_run):
    step = make_train_step(MODEL, config(mode))
    state = init_train_state(MODEL, config(mode))
    losses = []
    for _ in range(2):
        state, metrics = step(state, batch())
        losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
        assert bool(metrics["finite"])
    # the same numbers up to float32 rounding (checkify's checks change XLA's fusion); Adam turns
    # rounding in near-zero gradients into updates of up to ~lr, hence atol on the parameters
    _, plain_losses, plain_params = plain_run
    np.testing.assert_allclose(losses, plain_losses, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=3e-5),
        jax.tree.map(np.asarray, state.params),
        plain_params,
    )

    with pytest.raises(TrainingError) as error:
        step(state, batch(out_of_range=True))
    message = str(error.value)
    assert f"debug_checks={mode}: step 3:" in message
    if mode == "checkify":  # the out-of-range gather into the (257, 32) token embedding
        assert "out-of-bounds" in message and "index 262" in message and "257" in message
    else:  # jax_debug_nans: the NaN, then the op-by-op re-run names the id or the op
        assert "262" in message or "nan" in message.lower()


def test_without_debug_checks_the_same_batch_is_a_skipped_nonfinite_step(plain_run):
    """The default keeps the fast path: no error, the step reports finite=False and the fit loop stops
    (or skips) naming the step (tests/test_train.py)."""
    step = plain_run[0]
    state, metrics = step(init_train_state(MODEL, config("off")), batch(out_of_range=True))
    assert not bool(metrics["finite"])


def test_cli_debug_checks_flag_is_checked(capsys, tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["train", "--preset", "tiny", "--out", str(tmp_path / "x"), "--debug-checks=always"])
    assert "invalid choice: 'always'" in capsys.readouterr().err
    assert cli.main(["train", "--preset", "tiny", "--out", str(tmp_path / "x"), "--debug_checks=always"]) == 2
    assert "debug_checks must be one of" in capsys.readouterr().err
