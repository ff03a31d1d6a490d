"""Reliability: SIGKILL anywhere, half-written and corrupt checkpoints, damaged exports and data
files, a disk that fills up during a save. Each test holds one line of README's Reliability table."""

import errno
import gzip
import os
import pathlib
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from jaxrm import checkpoint, cli
from jaxrm.checkpoint import (
    MANIFEST,
    Checkpointer,
    CheckpointError,
    CorruptCheckpoint,
    load_safetensors,
    save_safetensors,
)
from jaxrm.config import RunConfig, TrainConfig
from jaxrm.formats import DataError, load_pairs
from jaxrm.loop import fit
from jaxrm.state import abstract_train_state
from tests.conftest import make_run, weights, write_pairs

REPO = pathlib.Path(__file__).resolve().parents[1]


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a), [k for k in a if not np.array_equal(a[k], b[k])]


def flip_bit(path, offset: int, bit: int = 0):
    data = bytearray(pathlib.Path(path).read_bytes())
    data[offset] ^= 1 << bit
    pathlib.Path(path).write_bytes(bytes(data))


def truncate(path, keep: float = 0.5):
    data = pathlib.Path(path).read_bytes()
    pathlib.Path(path).write_bytes(data[: int(len(data) * keep)])


def largest_file(directory) -> pathlib.Path:
    return max((p for p in pathlib.Path(directory).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


# ----------------------------------------------------------------------------- crash anywhere


def _launch(argv, env, kill_after_steps, pause_dir, timeout=240):
    """Run `jaxrm train`; SIGKILL it when it has printed `kill_after_steps` step lines, or as soon as
    it sits in a requested save pause. Returns (why it ended, exit code, output)."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO
    )
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    paused_before = set(pause_dir.glob("*.paused"))
    deadline, why = time.time() + timeout, "exited"
    while proc.poll() is None:
        paused = set(pause_dir.glob("*.paused")) - paused_before
        if paused:
            why = "save:" + paused.pop().name
        elif (
            kill_after_steps is not None
            and sum(x.startswith("step ") for x in list(lines)) >= kill_after_steps
        ):
            why = "step"
        elif time.time() > deadline:
            why = "timeout"
        else:
            time.sleep(0.02)
            continue
        proc.send_signal(signal.SIGKILL)
        break
    proc.wait()
    reader.join(timeout=30)
    return why, proc.returncode, "".join(lines)


def test_sigkill_anywhere_then_rerun_gives_the_uninterrupted_parameters(tmp_path):
    """SIGKILL during a step, inside Orbax's save (files written, not renamed) and between the rename
    and our manifest; rerunning the same command until it exits 0 gives bit-identical weights."""
    rng = random.Random(7)
    kill_at_step = rng.randint(2, 5)  # step lines seen before the first SIGKILL
    rename_step, manifest_step = rng.choice([12, 16]), rng.choice([24, 28])
    data = write_pairs(tmp_path / "pairs.jsonl")
    env = {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla-cache"),  # compile once, not per launch
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "JAXRM_NO_TCMALLOC": "1",
    }

    def train(out, pause_dir):  # `jaxrm train`, with the save pauses of tests/pausing_train.py
        pause_dir.mkdir(exist_ok=True)
        argv = [
            sys.executable,
            "-m",
            "tests.pausing_train",
            str(pause_dir),
            "train",
            "--preset",
            "tiny",
            "--out",
            str(out),
            "--data",
            data,
            "--tokenizer=byte",
            "--vocab_size=257",
            "--d_model=32",
            "--dff=64",
            "--seq_len=32",
            "--batch_size=8",
            "--max_steps=36",
            "--lr_decay_steps=36",
            "--warmup_steps=2",
            "--checkpoint_every=4",
            "--eval_every=1000",
            "--log_every=1",
            "--keep_checkpoints=2",
        ]
        return argv, env

    argv, straight_env = train(tmp_path / "straight", tmp_path / "no-pauses")
    why, code, output = _launch(argv, straight_env, None, tmp_path / "no-pauses")
    assert (why, code) == ("exited", 0), output

    pauses = tmp_path / "pauses"
    argv, killed_env = train(tmp_path / "killed", pauses)
    for point, step in (("rename", rename_step), ("manifest", manifest_step)):
        (pauses / f"{point}.{step}").touch()
    history = []
    for _ in range(6):  # SIGKILL once after a few steps, then at each requested save pause
        kill_after = None if any(why == "step" for why, _, _ in history) else kill_at_step
        why, code, output = _launch(argv, killed_env, kill_after, pauses)
        history.append((why, code, output))
        assert why != "timeout", output
        if why == "exited":
            break
        assert code == -signal.SIGKILL, output
    assert history[-1][:2] == ("exited", 0), history[-1][2]
    reasons = [why for why, _, _ in history]
    assert "step" in reasons and {
        f"save:rename.{rename_step}.paused",
        f"save:manifest.{manifest_step}.paused",
    } <= set(reasons), reasons
    # the step killed between Orbax's rename and the manifest was set aside, not resumed from
    after_manifest_kill = history[reasons.index(f"save:manifest.{manifest_step}.paused") + 1][2]
    assert f"checkpoint step {manifest_step}:" in after_manifest_kill and "incomplete" in after_manifest_kill
    assert f"step {manifest_step - 4}" in after_manifest_kill.split("resumed from", 1)[1].splitlines()[0]
    assert (tmp_path / "killed" / "checkpoints" / f"{manifest_step}.incomplete").is_dir()
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "killed"))


def test_half_written_checkpoints_are_never_the_latest(tmp_path):
    state = {"w": np.arange(1000, dtype=np.float32), "b": np.ones(3, np.float32)}
    ckpt = Checkpointer(tmp_path / "ck", keep=3)
    ckpt.save(4, state, {"data": 4})
    step4 = tmp_path / "ck" / "4"
    # a save cut short inside Orbax (temporary directory), and one cut short after Orbax's rename
    shutil.copytree(step4, tmp_path / "ck" / "8.orbax-checkpoint-tmp")
    shutil.copytree(step4, tmp_path / "ck" / "12")
    (tmp_path / "ck" / "12" / MANIFEST).unlink()
    truncate(largest_file(tmp_path / "ck" / "12"))
    fresh = Checkpointer(tmp_path / "ck")
    assert fresh.all_steps() == [4] and fresh.latest_step() == 4
    with pytest.raises(CheckpointError, match="checkpoint step 12: .*incomplete"):
        fresh.restore(state, 12)
    messages = []
    assert fresh.latest_intact_step(messages.append) == 4
    assert len(messages) == 1 and "checkpoint step 12" in messages[0] and "12.incomplete" in messages[0]
    restored, meta = fresh.restore(state)
    assert meta == {"data": 4} and np.array_equal(restored["w"], state["w"])


# ----------------------------------------------------------------------------- corrupt files


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Weights of an uninterrupted 12-step run (checkpoints every 4 steps)."""
    tmp = tmp_path_factory.mktemp("straight")
    fit(_run12(tmp), tmp / "run")
    return weights(tmp / "run")


def _run12(tmp_path, **train):
    return make_run(tmp_path, max_steps=12, checkpoint_every=4, keep_checkpoints=3, eval_data="", **train)


def _stopped_at(run, steps):
    return RunConfig(run.model, TrainConfig(**{**run.train.__dict__, "max_steps": steps}))


def test_corrupt_checkpoint_is_named_and_resume_falls_back_to_an_intact_one(tmp_path, straight, capsys):
    run = _run12(tmp_path)
    out = tmp_path / "run"
    fit(_stopped_at(run, 8), out)  # checkpoints 4 and 8
    damaged = largest_file(out / "checkpoints" / "8" / "state")  # array data: Orbax has no checksum
    flip_bit(damaged, damaged.stat().st_size // 2, 3)
    target = abstract_train_state(run.model, run.train)
    with pytest.raises(CorruptCheckpoint, match=f"checkpoint step 8: {damaged}: sha256 differs"):
        Checkpointer(out / "checkpoints").restore(target, 8)
    Checkpointer(out / "checkpoints").restore(target, 4)  # the earlier step is usable
    messages = []
    fit(run, out, log=messages.append)
    assert any(f"checkpoint step 8: {damaged}" in m and "8.corrupt" in m for m in messages), messages
    assert any(m.startswith("resumed from") and m.endswith("step 4") for m in messages), messages
    assert_same_weights(straight, weights(out))
    # a damaged export: every reader names the file
    export = out / "model.safetensors"
    flip_bit(export, export.stat().st_size - 5)
    assert cli.main(["eval", str(out), "--data", run.train.data]) == 2
    assert f"{export}: tensor " in capsys.readouterr().err


def test_truncated_checkpoint_is_named_and_a_run_with_no_intact_one_stops(tmp_path):
    state = {"w": np.arange(5000, dtype=np.float32)}
    ckpt = Checkpointer(tmp_path / "ck", keep=3)
    for step in (1, 2):
        ckpt.save(step, {"w": state["w"] + step}, {"step": step})
    truncate(largest_file(tmp_path / "ck" / "2"))
    fresh = Checkpointer(tmp_path / "ck")
    with pytest.raises(CorruptCheckpoint, match=r"checkpoint step 2: .*bytes, \d+ when saved \(truncated"):
        fresh.restore(state, 2)
    assert np.array_equal(fresh.restore(state, 1)[0]["w"], state["w"] + 1)
    messages = []
    assert fresh.latest_intact_step(messages.append) == 1 and "2.corrupt" in messages[0]
    flip_bit(largest_file(tmp_path / "ck" / "1"), 100)
    with pytest.raises(CheckpointError, match=r"no intact checkpoint left .*step\(s\) \[1\] are corrupt"):
        Checkpointer(tmp_path / "ck").latest_intact_step(messages.append)


def test_damaged_safetensors_is_named(tmp_path):
    path = tmp_path / "model.safetensors"
    tensors = {"a": np.arange(64, dtype=np.float32), "b": np.ones((4, 4), np.float32)}
    save_safetensors(tensors, path, metadata={"format": "torchref"})
    loaded, metadata = load_safetensors(path)
    assert_same_weights(tensors, loaded) and metadata["format"] == "torchref"
    good = path.read_bytes()
    for offset in (len(good) - 1, len(good) - 64 * 4):  # a bit in "b", then one in "a"
        flip_bit(path, offset, 6)
        with pytest.raises(CheckpointError, match=rf"{path}: tensor '[ab]' differs from the sha256"):
            load_safetensors(path)
        path.write_bytes(good)
    truncate(path, 0.9)
    with pytest.raises(CheckpointError, match=f"{path}: not a readable safetensors file"):
        load_safetensors(path)
    path.write_bytes(good[:6] + b"\xff" + good[7:])  # the header's length
    with pytest.raises(CheckpointError, match=f"{path}: not a readable safetensors file"):
        load_safetensors(path)


def test_damaged_jsonl_names_the_file_and_line(tmp_path):
    path = pathlib.Path(write_pairs(tmp_path / "pairs.jsonl"))
    good = path.read_bytes()
    starts = [0] + [i + 1 for i, c in enumerate(good) if c == ord("\n")][:-1]
    cases = [
        (starts[4] + 20, 7, r":5: not valid UTF-8"),  # a high bit: invalid UTF-8
        (starts[6], 0, r":7: malformed JSON"),  # '{' -> 'z'
        (starts[9] + 18, 0, r":10: missing key\(s\) 'chosen'"),
    ]  # "chosen" -> "bhosen"
    for offset, bit, message in cases:
        flip_bit(path, offset, bit)
        with pytest.raises(DataError, match=f"{path}{message}"):
            load_pairs(path)
        path.write_bytes(good)
    path.write_bytes(good[: starts[20] + 30])  # cut inside line 21
    with pytest.raises(DataError, match=f"{path}:21: malformed JSON"):
        load_pairs(path)


def test_damaged_jsonl_gz_names_the_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl.gz"
    text = pathlib.Path(write_pairs(tmp_path / "pairs.jsonl", n=200)).read_bytes()
    good = gzip.compress(text, mtime=0)
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=rf"{path}:\d+: cannot read, the file is corrupt or truncated"):
        load_pairs(path)
    rng = random.Random(3)
    for _ in range(40):  # every flipped bit after the 10-byte header
        path.write_bytes(good)
        flip_bit(path, rng.randrange(10, len(good)), rng.randrange(8))
        with pytest.raises(DataError, match=rf"{path}(:\d+)?: "):
            load_pairs(path)


# ----------------------------------------------------------------------------- full disk


@pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning"
)  # Orbax's abandoned writer loop
def test_disk_full_during_a_save_stops_clearly_and_the_previous_checkpoint_resumes(
    tmp_path, straight, monkeypatch
):
    """The second save hits a real write error inside Orbax (RLIMIT_FSIZE: EFBIG, as ENOSPC would)."""
    run = _run12(tmp_path)
    out = tmp_path / "run"
    save, calls = Checkpointer.save, []

    def save_on_a_full_disk(self, step, state, meta):
        calls.append(step)
        if len(calls) != 2:
            return save(self, step, state, meta)
        old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))
        try:
            return save(self, step, state, meta)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, old_handler)

    monkeypatch.setattr(Checkpointer, "save", save_on_a_full_disk)
    with pytest.raises(
        CheckpointError,
        match=rf"could not save checkpoint step 8 in {out / 'checkpoints'}: "
        r".*File too large.*Checkpoint step 4 is intact",
    ):
        fit(run, out)
    # step 8 is not listed (what Orbax left of it is removed best-effort: tensorstore may still be writing)
    assert Checkpointer(out / "checkpoints").all_steps() == [4] and not (out / "checkpoints" / "8").exists()
    monkeypatch.undo()
    messages = []
    fit(run, out, log=messages.append)
    assert any(m.startswith("resumed from") and m.endswith("step 4") for m in messages), messages
    assert_same_weights(straight, weights(out))


def test_no_space_left_while_writing_the_manifest(tmp_path, monkeypatch):
    state = {"w": np.arange(100, dtype=np.float32)}
    ckpt = Checkpointer(tmp_path / "ck")
    ckpt.save(1, state, {})

    def no_space(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(checkpoint, "_write_atomic", no_space)
    with pytest.raises(
        CheckpointError, match=r"step 2 in .*No space left on device.*Checkpoint step 1 is intact"
    ):
        ckpt.save(2, {"w": state["w"] + 1}, {})
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["1"]
    fresh = Checkpointer(tmp_path / "ck")
    assert fresh.latest_intact_step() == 1 and np.array_equal(fresh.restore(state)[0]["w"], state["w"])
    fresh.save(2, {"w": state["w"] + 1}, {})  # the same step saves once there is space
    assert Checkpointer(tmp_path / "ck").latest_step() == 2
