"""The fit loop end to end on a tiny byte-level model: resume, faults, config checks, CLI."""

import json
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxrm import cli
from jaxrm.checkpoint import Checkpointer, load_safetensors
from jaxrm.config import RunConfig, TrainConfig
from jaxrm.loop import TrainingError, fit
from jaxrm.optim import decay_mask, learning_rate
from jaxrm.sharding import shard_batch
from jaxrm.state import init_train_state
from jaxrm.step import make_train_step
from tests.conftest import MODEL, make_run, weights


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    run = make_run(tmp_path)
    fit(run, tmp_path / "straight")
    interrupted = RunConfig(run.model, TrainConfig(**{**run.train.__dict__, "max_steps": 6}))
    fit(interrupted, tmp_path / "resumed")  # stops at step 6 ...
    assert Checkpointer(tmp_path / "resumed" / "checkpoints").latest_step() == 6
    fit(run, tmp_path / "resumed")  # ... and continues to 12
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    losses = lambda d: [r["loss"] for r in map(json.loads, open(d / "metrics.jsonl")) if r["kind"] == "train"]
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert len(losses(tmp_path / "straight")) == 12


def test_training_learns_the_synthetic_preference(tmp_path):
    run = make_run(tmp_path, max_steps=60, lr_decay_steps=60, eval_every=60, checkpoint_every=60)
    summary = fit(run, tmp_path / "run")
    assert summary["validation"]["accuracy"] >= 0.9, summary
    assert (tmp_path / "run" / "curves.png").stat().st_size > 10_000


def test_keeps_only_the_last_checkpoints(tmp_path):
    fit(make_run(tmp_path), tmp_path / "run")
    assert Checkpointer(tmp_path / "run" / "checkpoints").all_steps() == [8, 12]


def test_resuming_with_another_config_is_refused(tmp_path):
    run = make_run(tmp_path, max_steps=4)
    fit(run, tmp_path / "run")
    other = RunConfig(run.model, TrainConfig(**{**run.train.__dict__, "learning_rate": 1e-2}))
    with pytest.raises(TrainingError, match="learning_rate: checkpoint has 0.003, this run 0.01"):
        fit(other, tmp_path / "run")


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    run = make_run(tmp_path, learning_rate=1e30, min_lr=0.0, checkpoint_every=1, grad_clip=0.0)
    with pytest.raises(
        TrainingError, match=r"non-finite loss or gradient at step (\d+).*Last good checkpoint: step"
    ):
        fit(run, tmp_path / "run")
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints")
    from jaxrm.state import abstract_train_state

    state, _ = ckpt.restore(abstract_train_state(run.model, run.train))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def test_nonfinite_steps_can_be_skipped_up_to_a_limit(tmp_path):
    run = make_run(
        tmp_path, learning_rate=1e30, min_lr=0.0, grad_clip=0.0, nonfinite="skip", max_nonfinite_skips=3
    )
    with pytest.raises(TrainingError, match="4 non-finite steps in a row"):
        fit(run, tmp_path / "run")


def test_a_nonfinite_step_leaves_params_untouched():
    tc = TrainConfig(batch_size=2, max_steps=4, warmup_steps=1)
    state = init_train_state(MODEL, tc, seed=0)
    before = jax.tree.map(np.array, state.params)
    ids = np.full((4, 8), MODEL.pad_id, np.int32)
    ids[:, :3] = [[1, 2, 3], [1, 2, 4], [1, 5, 6], [1, 5, 7]]
    ids[0, 1] = MODEL.vocab_size + 5  # out of range: NaN under jit (never clamped)
    batch = shard_batch({"input_ids": ids, "margins": np.zeros(2, np.float32)}, None, 2)  # (2, 2, 8)
    state, metrics = make_train_step(MODEL, tc)(state, batch)
    assert not bool(metrics["finite"]) and int(state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, state.params), before)


def test_decay_mask_is_the_originals_ndim_rule():
    params = init_train_state(MODEL, TrainConfig(), seed=0).params
    mask = decay_mask(params)
    assert (
        mask["wte"]["embedding"]
        and mask["reward_head"]["kernel"]
        and mask["h"][0]["attn"]["c_attn"]["kernel"]
    )
    assert not mask["h"][0]["attn"]["c_attn"]["bias"] and not mask["ln_f"]["scale"]


def test_learning_rate_schedule_is_nanogpts():
    kw = dict(peak=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=100)
    assert float(learning_rate(0, **kw)) == pytest.approx(1e-3 * 1 / 11)
    assert float(learning_rate(9, **kw)) == pytest.approx(1e-3 * 10 / 11)
    assert float(learning_rate(10, **kw)) == pytest.approx(1e-3)
    assert float(learning_rate(55, **kw)) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-5)
    assert float(learning_rate(100, **kw)) == pytest.approx(1e-4)
    assert float(learning_rate(500, **kw)) == pytest.approx(1e-4)


def test_cli_train_eval_score(tmp_path, capsys):
    run = make_run(tmp_path)
    out = tmp_path / "cli"
    args = [
        "train",
        "--preset",
        "tiny",
        "--out",
        str(out),
        "--data",
        run.train.data,
        "--tokenizer=byte",
        "--vocab_size=257",
        "--d_model=32",
        "--max_steps=6",
        "--seq_len=32",
        f"--eval_data={run.train.data}",
        "--batch_size=8",
        "--checkpoint_every=3",
    ]
    assert cli.main(args) == 0
    assert "validation: pairwise accuracy" in capsys.readouterr().out
    assert cli.main(["eval", str(out), "--data", run.train.data, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["pairs"] == 48 and 0 <= result["accuracy"] <= 1
    assert cli.main(["score", str(out), "--prompt", "Q:", " good!!", " good."]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["text"] for x in lines] == [" good!!", " good."] and all(
        np.isfinite(x["reward"]) for x in lines
    )
    assert cli.main(["convert", str(out), str(tmp_path / "export" / "rm.safetensors")]) == 0
    exported = load_safetensors(tmp_path / "export" / "rm.safetensors")[0]
    assert all(np.array_equal(exported[k], v) for k, v in weights(out).items())


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--preset", "tiny", "--max_steps=x"], "needs a int"),
        (["train", "--preset", "tiny", "--no_such_key=1"], "unknown config key 'no_such_key'"),
        (["train", "--preset", "nope"], "unknown preset 'nope'"),
        (["train", "--preset", "tiny", "--data", "/no/such/file.jsonl"], "/no/such/file.jsonl: no such file"),
        (["eval", "/no/such/run"], "config.json: no such file"),
    ],
)
def test_cli_bad_input_is_a_clear_error(argv, message, capsys, tmp_path):
    if "--data" not in argv and argv[0] == "train":
        argv = argv + ["--out", str(tmp_path / "x")]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_malformed_data_line_is_named(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"chosen": "a", "rejected": "b"}\n{"chosen": "a", "rejected": \n')
    assert cli.main(["train", "--preset", "tiny", "--data", str(path), "--out", str(tmp_path / "r")]) == 2
    assert f"{path}:2: malformed JSON" in capsys.readouterr().err


def test_sigterm_saves_and_resume_matches(tmp_path):
    """A preempted run (SIGTERM) saves its step, exits 75, and resuming ends where a straight run does."""
    run = make_run(tmp_path, max_steps=400, lr_decay_steps=400, checkpoint_every=400, eval_every=400)
    fit(RunConfig(run.model, TrainConfig(**{**run.train.__dict__, "max_steps": 400})), tmp_path / "straight")
    config = tmp_path / "run.json"
    config.write_text(json.dumps(run.to_dict()))
    code = (
        "import json,sys; from jaxrm.config import RunConfig; from jaxrm.loop import fit;"
        "fit(RunConfig.from_dict(json.load(open(sys.argv[1]))), sys.argv[2])"
    )
    script = (
        f"import sys; from jaxrm.loop import Preempted\ntry:\n  exec({code!r})\n"
        "except Preempted as e:\n  print(e); sys.exit(75)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(config), str(tmp_path / "pre")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = tmp_path / "pre" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 20):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, output
    saved = Checkpointer(tmp_path / "pre" / "checkpoints").latest_step()
    assert 20 <= saved < 400 and f"saved checkpoint step {saved}" in output
    fit(run, tmp_path / "pre")
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "pre")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_mixed_precision_step_keeps_float32_state():
    tc = TrainConfig(batch_size=2, max_steps=4, warmup_steps=1)
    bf16 = MODEL.replace(dtype="bfloat16")
    state = init_train_state(bf16, tc, seed=0)
    ids = np.full((4, 8), MODEL.pad_id, np.int32)
    ids[:, :3] = [[1, 2, 3], [1, 2, 4], [1, 5, 6], [1, 5, 7]]
    batch = shard_batch({"input_ids": ids, "margins": np.zeros(2, np.float32)}, None, 2)  # (2, 2, 8)
    state, metrics = make_train_step(bf16, tc)(state, batch)
    assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))
    leaves = jax.tree.leaves((state.params, state.opt_state))
    assert all(x.dtype == np.float32 for x in leaves if np.issubdtype(x.dtype, np.floating))
