"""Sharded training on a device mesh and across processes (CPU, forced host devices).

The multi-device runs happen in subprocesses (tests/sharding_worker.py) because
XLA_FLAGS=--xla_force_host_platform_device_count must be set before jax starts; the rest of
the suite keeps its single CPU device.

Tolerance (float32, jax_default_matmul_precision="highest"): a mesh changes the order of the
reductions (gradient sums over devices), nothing else. Measured over 10 AdamW steps (lr 3e-3)
on this machine: per-step losses within 3.1e-7 relative; parameters within 3e-5 relative (norm
of difference / norm) for the weight matrices and embeddings and 1.3e-4 for the worst bias (a
LayerNorm bias, small and moved by Adam's normalised steps); largest absolute difference 5.8e-5.
Tested at 1e-5 (losses) and 5e-4 (parameters). Exempt, as in the parity tests: ln_f.bias and the
key bias (middle third of c_attn.bias) have gradients that are exactly zero in exact
arithmetic, so Adam turns float noise into steps of ~lr; they are checked to stay within what
10 such steps can reach (2 x steps x lr).
"""

import json
import os
import socket
import subprocess
import sys
import types

import numpy as np
import pytest

from jaxrm import sharding as shd
from tests.conftest import weights, write_pairs

WORKER = os.path.join(os.path.dirname(__file__), "sharding_worker.py")
STEPS, LR, D_MODEL = 10, 3e-3, 32


def worker(args, devices, timeout=600, **popen):
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
    }
    return subprocess.Popen(
        [sys.executable, WORKER, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 8-device subprocess: 1 device, data=8, fsdp=8, data=2 x fsdp=4, checkpoint restore.
    (Two processes: test_cli_... below, through `jaxrm train --coordinator`.)"""
    d = tmp_path_factory.mktemp("sharding")
    finish(worker(["equivalence", str(d / "eq.json")], devices=8))
    npz = np.load(str(d / "eq.json") + ".npz")
    params = {}
    for key in npz.files:
        name, path = key.split("/", 1)
        params.setdefault(name, {})[path] = npz[key]
    return {"eq": json.load(open(d / "eq.json")), "params": params}


def exempt(key: str, ref: np.ndarray) -> np.ndarray:
    """Mask of the entries whose gradient is exactly zero in exact arithmetic."""
    mask = np.zeros(ref.shape, bool)
    if key == "['ln_f']['bias']":
        mask[:] = True
    if key.endswith("['attn']['c_attn']['bias']"):
        mask[D_MODEL : 2 * D_MODEL] = True
    return mask


def assert_same_params(ref: dict, got: dict) -> float:
    assert set(ref) == set(got)
    worst = 0.0
    for key, a in ref.items():
        b, mask = got[key], exempt(key, a)
        assert np.abs(a - b)[mask].max(initial=0) <= 2 * STEPS * LR, key
        diff = np.where(mask, 0, a - b)
        if mask.all():
            continue
        rel = np.linalg.norm(diff) / np.linalg.norm(np.where(mask, 0, a))
        assert rel <= 5e-4, (key, rel)
        worst = max(worst, rel)
    return worst


def assert_same_losses(ref, got):
    assert len(ref) == len(got) == STEPS
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("mesh", ["8x1", "1x8", "2x4"])
def test_mesh_training_equals_one_device(runs, mesh):
    eq = runs["eq"]
    assert eq["devices"] == 8
    assert_same_losses(eq["1"], eq[mesh])
    assert_same_params(runs["params"]["1"], runs["params"][mesh])


def test_bfloat16_mesh_training_equals_one_device(runs):
    eq = runs["eq"]
    assert len(eq["bf16_2x4"]) == 3 and all(np.isfinite(eq["bf16_2x4"]))
    assert eq["bf16_1"] != eq["1"][:3]  # really bf16
    np.testing.assert_allclose(eq["bf16_2x4"], eq["bf16_1"], rtol=2e-3, atol=0)


def test_params_and_optimizer_state_are_really_sharded(runs):
    shards = runs["eq"]
    kernel, adam_mu = "['h'][0]['mlp']['c_fc']['kernel']", "['h'][0]['mlp']['c_fc']['kernel']"
    # data=8: replicated, 8 full copies
    assert shards["8x1_shards"][".params" + kernel] == [[32, 64]] * 8
    # fsdp=8: largest dimension (64) split 8 ways; Adam's moments alike
    assert shards["1x8_shards"][".params" + kernel] == [[32, 8]] * 8
    assert shards["1x8_shards"][".opt_state[1][0].mu" + adam_mu] == [[32, 8]] * 8
    # wte (257, 32): 257 does not divide, so the 32 columns are split; wpe (32, 32): the first dim
    assert shards["1x8_shards"][".params['wte']['embedding']"] == [[257, 4]] * 8
    assert shards["1x8_shards"][".params['wpe']['embedding']"] == [[4, 32]] * 8
    # data=2 x fsdp=4: each fsdp shard held by 2 devices
    assert shards["2x4_shards"][".params" + kernel] == [[32, 16]] * 8
    assert shards["2x4_shards"][".step"] == [[]] * 8


def test_sharded_checkpoint_restores_onto_another_mesh(runs):
    restore = runs["eq"]["restore"]
    assert restore["step"] == STEPS and restore["meta"] == {"note": "sharded"}
    assert restore["devices"] == [0, 1, 2, 3]  # 8 devices -> 4
    assert restore["shards"][".params['h'][0]['mlp']['c_fc']['kernel']"] == [[32, 16]] * 4
    ref, got = runs["params"]["2x4"], runs["params"]["restored"]
    assert all(np.array_equal(ref[k], got[k]) for k in ref)  # bit-exact
    assert np.isfinite(restore["next_loss"])


# -----------------------------------------------------------------------------
# in-process: rules and bad input


def test_param_spec_rule():
    from jax.sharding import PartitionSpec as P

    assert shd.param_spec((768, 3072), 8) == P(None, "fsdp")
    assert shd.param_spec((50257, 768), 8) == P(None, "fsdp")  # 50257 does not divide by 8
    assert shd.param_spec((1024, 768), 4) == P("fsdp", None)
    assert shd.param_spec((768, 768), 4) == P("fsdp", None)  # the first of equal dims
    assert shd.param_spec((7,), 4) == P() and shd.param_spec((), 4) == P()
    assert shd.param_spec((768, 3072), 1) == P()


def test_one_by_one_mesh_is_the_unsharded_path():
    assert shd.make_mesh(1, 1) is None


def test_mesh_larger_than_devices_is_a_clear_error():
    with pytest.raises(
        shd.ShardingError, match=r"mesh data=2 x fsdp=4 needs 8 devices but only 1 are present"
    ):
        shd.make_mesh(2, 4)
    with pytest.raises(shd.ShardingError, match="mesh_fsdp must be a positive int"):
        shd.make_mesh(1, 0)


def test_batch_not_divisible_by_data_parallel_size():
    mesh = types.SimpleNamespace(shape={"data": 2, "fsdp": 4})
    assert shd.batch_size_per_shard(mesh, 16) == 2
    with pytest.raises(
        shd.ShardingError,
        match=r"does not divide by the data-parallel size data x fsdp = 8; "
        r"use a batch_size that is a multiple of 8",
    ):
        shd.batch_size_per_shard(mesh, 12)
    with pytest.raises(shd.ShardingError, match="multiple of 16"):
        shd.batch_size_per_shard(mesh, 24, grad_accum_steps=2)


def test_unreachable_coordinator_is_a_clear_error_after_the_timeout():
    port = free_port()  # nothing listens there
    code = (
        "from jaxrm import sharding as shd\n"
        f"shd.initialize_distributed('127.0.0.1:{port}', 2, 1, timeout_s=2)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert (
        f"cannot reach the coordinator 127.0.0.1:{port} (process 0) from process 1 of 2 within 2 s"
        in out.stderr
    )


def test_bad_coordinator_arguments():
    with pytest.raises(shd.ShardingError, match="HOST:PORT"):
        shd.initialize_distributed("localhost", 2, 0)
    with pytest.raises(shd.ShardingError, match="process-id must be in"):
        shd.initialize_distributed("127.0.0.1:1234", 2, 2)


# -----------------------------------------------------------------------------
# the CLI: jaxrm train on a mesh, resumed on another; two processes joined by --coordinator

CLI_ARGS = [
    "--vocab_size=257",
    "--d_model=32",
    "--num_heads=4",
    "--dff=64",
    "--num_layer=2",
    "--block_size=32",
    "--tokenizer=byte",
    "--seq_len=32",
    "--batch_size=8",
    "--warmup_steps=2",
    "--lr_decay_steps=6",
    "--checkpoint_every=2",
    "--eval_every=6",
    "--embed_pdrop=0",
    "--attn_pdrop=0",
    "--resid_pdrop=0",
    "--dropout=0",
    "--log_every=1",
]


def cli(args, devices, out):
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "jaxrm.cli", "train", "--preset", "tiny", "--out", str(out), *CLI_ARGS, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def train_losses(run_dir):
    return [r["loss"] for r in map(json.loads, open(run_dir / "metrics.jsonl")) if r["kind"] == "train"]


def test_cli_two_processes_and_a_resume_on_another_mesh_equal_one_device(tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    port = free_port()
    # 2 processes x 2 devices (data=2 x fsdp=2), while the single-device reference runs here
    procs = [
        cli(
            [
                f"--data={data}",
                "--max_steps=6",
                "--mesh_data=2",
                "--mesh_fsdp=2",
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            2,
            tmp_path / "procs",
        )
        for i in range(2)
    ]
    reference = cli([f"--data={data}", "--max_steps=6"], 1, tmp_path / "one")
    logs = [finish(p) for p in procs]
    finish(reference)
    assert "this process loads pairs 0..3 of each batch" in logs[0]
    assert "this process loads pairs 4..7 of each batch" in logs[1]
    assert "wall time" in logs[0] and "wall time" not in logs[1]  # process 0 reports
    # 8 devices (data=2 x fsdp=4) for 4 steps, then resumed on 4 devices (fsdp=4) to 6
    finish(cli([f"--data={data}", "--max_steps=4", "--mesh_data=2", "--mesh_fsdp=4"], 8, tmp_path / "mesh"))
    log = finish(cli([f"--data={data}", "--max_steps=6", "--mesh_fsdp=4"], 8, tmp_path / "mesh"))
    assert "resumed from" in log and "mesh data=1 x fsdp=4" in log
    ref = train_losses(tmp_path / "one")
    assert len(ref) == 6
    for run in ("procs", "mesh"):
        np.testing.assert_allclose(train_losses(tmp_path / run), ref, rtol=1e-5, atol=0)
        a, b = weights(tmp_path / "one"), weights(tmp_path / run)
        assert all(np.allclose(a[k], b[k], rtol=0, atol=2 * 6 * 1e-3) for k in a)  # see the module docstring
        assert (
            max(
                np.linalg.norm(a[k] - b[k]) / np.linalg.norm(a[k])
                for k in a
                if "ln_f.bias" not in k and "c_attn.bias" not in k
            )
            <= 5e-4
        )


def test_cli_mesh_larger_than_devices_is_a_clear_error(tmp_path, capsys):
    from jaxrm import cli

    assert cli.main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--mesh_fsdp=4"]) == 2
    assert "mesh data=1 x fsdp=4 needs 4 devices but only 1 are present" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
