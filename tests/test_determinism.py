"""Determinism (issue 7): the same seed gives bit-identical parameters on CPU, with dropout on, in
the same process and in another one started by the CLI; `--deterministic` puts the XLA settings
that make GPU ops deterministic into XLA_FLAGS before JAX starts its backend."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from jaxrm import runtime
from jaxrm.config import RunConfig, TrainConfig, run_preset
from jaxrm.loop import fit
from tests.conftest import weights, write_pairs

TRAIN = dict(
    tokenizer="byte",
    seq_len=32,
    batch_size=4,
    max_steps=3,
    warmup_steps=1,
    lr_decay_steps=3,
    learning_rate=3e-3,
    min_lr=3e-4,
    checkpoint_every=3,
    eval_every=3,
    eval_pairs=16,
    log_every=100,
)
FLAGS = runtime.DETERMINISTIC_XLA_FLAGS


def tiny_run(data: str, **train) -> RunConfig:
    """The tiny preset (dropout 0.1 everywhere) on a small byte-level file, a few steps."""
    base = run_preset("tiny")
    run = RunConfig(
        base.model, TrainConfig(**{**base.train.__dict__, **TRAIN, "data": data, "eval_data": data, **train})
    )
    assert min(run.model.embed_pdrop, run.model.attn_pdrop, run.model.resid_pdrop, run.model.dropout) > 0
    return run


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("determinism")
    data = write_pairs(root / "pairs.jsonl", n=24)
    fit(tiny_run(data), root / "a", log=lambda message: None)
    return root, data


def train_losses(run_dir):
    return [r["loss"] for r in map(json.loads, open(run_dir / "metrics.jsonl")) if r["kind"] == "train"]


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not np.array_equal(wa[k], wb[k])]
    assert not different, f"parameters differ: {different}"


def test_same_seed_same_process_gives_bit_identical_parameters(first_run):
    root, data = first_run
    fit(tiny_run(data), root / "b", log=lambda message: None)
    assert_same_weights(root / "a", root / "b")
    assert train_losses(root / "a") == train_losses(root / "b") and len(train_losses(root / "a")) == 3


def test_cli_deterministic_flag_sets_xla_flags_before_jax_starts_and_matches(first_run):
    """Another process, through the CLI with --deterministic: the flags are in XLA_FLAGS in time
    (no too-late warning), the run records deterministic=true, and its parameters equal the
    in-process run's bit for bit."""
    root, data = first_run
    out = root / "cli"
    overrides = [f"--{k}={v}" for k, v in TRAIN.items()] + [f"--eval_data={data}"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxrm.cli",
            "train",
            "--preset",
            "tiny",
            "--out",
            str(out),
            "--data",
            data,
            "--deterministic",
            *overrides,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if line.startswith("deterministic: XLA_FLAGS=")]
    assert said and all(flag in said[0] for flag in FLAGS) and "too late" not in said[0], proc.stderr[-3000:]
    assert "already initialized" not in proc.stderr
    assert json.loads((out / "config.json").read_text())["train"]["deterministic"] is True
    assert_same_weights(root / "a", out)


def test_use_deterministic_ops_appends_once_and_replaces_other_values():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_gpu_deterministic_ops=false"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # this pytest process has started JAX already
        runtime.use_deterministic_ops(env)
        runtime.use_deterministic_ops(env)
    flags = env["XLA_FLAGS"].split()
    assert flags == ["--xla_force_host_platform_device_count=2", *FLAGS]
    env = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runtime.use_deterministic_ops(env)
    assert env["XLA_FLAGS"].split() == list(FLAGS)


def test_use_deterministic_ops_warns_once_the_backend_has_started():
    import jax

    jax.devices()  # make sure this process's backend is up
    assert runtime.backend_initialized()
    env = {}
    with pytest.warns(RuntimeWarning, match="already initialized its backend"):
        assert runtime.use_deterministic_ops(env) is False
    assert runtime.use_deterministic_ops(env) is True  # already there: nothing to warn about


def test_use_deterministic_ops_before_jax_starts_warns_nothing():
    """In a fresh process: set before the backend starts, then JAX runs with the flags (XLA accepts
    them on CPU)."""
    code = (
        "import warnings, jax, jax.numpy as jnp; warnings.simplefilter('error');"
        "from jaxrm import runtime; assert not runtime.backend_initialized();"
        "assert runtime.use_deterministic_ops() is True; import os;"
        "print(float(jax.jit(lambda x: (x * x).sum())(jnp.arange(4.0)))); print(os.environ['XLA_FLAGS'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    value, flags = proc.stdout.strip().splitlines()
    assert float(value) == 14.0 and flags.split() == list(FLAGS)


def test_deterministic_and_debug_checks_are_config_keys_with_checked_values():
    run = run_preset("tiny").override({"deterministic": "true", "debug_checks": "checkify"})
    assert run.train.deterministic is True and run.train.debug_checks == "checkify"
    with pytest.raises(ValueError, match="debug_checks must be one of"):
        TrainConfig(debug_checks="always")
