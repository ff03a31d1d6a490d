"""Issue 16: jaxrm never overwrites what it did not write, never resumes onto a run that changed under
it without saying so, and says what it loaded. One test (or more) per defect of the issue, each
through the CLI with --preset tiny, the byte tokenizer and tiny data."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxrm import cli
from jaxrm.checkpoint import load_safetensors
from tests.conftest import write_pairs

README = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")


def train_argv(data, out, *more):
    """A tiny CLI run: 2 steps of 4 pairs on the byte tokenizer."""
    return [
        "train",
        "--preset",
        "tiny",
        "--data",
        str(data),
        "--out",
        str(out),
        "--tokenizer=byte",
        "--vocab_size=257",
        "--max_steps=2",
        "--checkpoint_every=2",
        "--warmup_steps=1",
        "--batch_size=4",
        *more,
    ]


def snapshot(directory):
    """{relative path: bytes} of every file under `directory`."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(data file, a finished tiny run directory)."""
    root = tmp_path_factory.mktemp("finished")
    data = write_pairs(root / "pairs.jsonl", n=40)
    assert cli.main(train_argv(data, root / "run")) == 0
    return root / "pairs.jsonl", root / "run"


@pytest.fixture(scope="module")
def hf_dir(finished, tmp_path_factory):
    """A transformers GPT2ForSequenceClassification directory (exported from the finished run)."""
    from jaxrm.convert import export_hf_sequence_classification
    from jaxrm.rundir import load_model

    out = tmp_path_factory.mktemp("hf") / "hfcopy"
    export_hf_sequence_classification(load_model(finished[1])[1], out)
    return out


# 1. train --out never writes into a directory it did not write, nor into the --init source


def test_train_refuses_a_non_empty_directory_that_is_not_a_run(finished, tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "config.json").write_text('{"mine": 1}\n')
    before = snapshot(notes)
    assert cli.main(train_argv(finished[0], notes)) == 2
    err = capsys.readouterr().err
    assert f"jaxrm train: error: {notes}" in err and "not a jaxrm run" in err and "--out" in err
    assert snapshot(notes) == before


def test_train_never_writes_into_the_init_source(finished, hf_dir, tmp_path, capsys):
    before = snapshot(hf_dir)
    assert cli.main(train_argv(finished[0], hf_dir, "--init", str(hf_dir))) == 2
    assert "--init" in capsys.readouterr().err
    assert snapshot(hf_dir) == before
    run_before = snapshot(finished[1])
    assert cli.main(train_argv(finished[0], finished[1], "--init", str(finished[1]))) == 2
    assert "--init" in capsys.readouterr().err
    assert snapshot(finished[1]) == run_before


def test_train_out_that_is_a_file_is_a_clear_error(finished, tmp_path, capsys):
    afile = tmp_path / "afile.txt"
    afile.write_text("mine\n")
    assert cli.main(train_argv(finished[0], afile)) == 2
    err = capsys.readouterr().err
    assert f"jaxrm train: error: --out {afile} is a file" in err and "Errno" not in err
    assert afile.read_text() == "mine\n"


# 2. convert refuses to overwrite (unless --force), never writes into its source, checks the format


def test_convert_into_an_hf_directory_without_to_is_refused(finished, hf_dir, capsys):
    before = snapshot(hf_dir)
    assert cli.main(["convert", str(finished[1]), str(hf_dir)]) == 2
    err = capsys.readouterr().err
    assert f"jaxrm convert: error: {hf_dir}" in err and "--force" in err
    assert snapshot(hf_dir) == before
    assert cli.main(["convert", str(finished[1]), str(hf_dir), "--to", "torchref", "--force"]) == 2
    assert "hf-seq-cls" in capsys.readouterr().err
    assert snapshot(hf_dir) == before


def test_convert_with_force_infers_the_format_of_an_hf_directory(finished, hf_dir, tmp_path):
    import shutil

    target = tmp_path / "hf"
    shutil.copytree(hf_dir, target)
    assert cli.main(["convert", str(finished[1]), str(target), "--force"]) == 0
    keys = set(load_safetensors(target / "model.safetensors")[0])
    assert "score.weight" in keys and "reward_head.weight" not in keys


def test_convert_never_writes_into_its_source(finished, capsys):
    before = snapshot(finished[1])
    for dst in (finished[1], finished[1] / "export"):
        for extra in ([], ["--force"]):
            assert cli.main(["convert", str(finished[1]), str(dst), "--to", "hf-seq-cls", *extra]) == 2
            assert "source" in capsys.readouterr().err
    assert snapshot(finished[1]) == before


def test_convert_refuses_to_overwrite_a_file_unless_forced(finished, tmp_path, capsys):
    dst = tmp_path / "w.safetensors"
    dst.write_bytes(b"mine")
    assert cli.main(["convert", str(finished[1]), str(dst)]) == 2
    assert "--force" in capsys.readouterr().err and dst.read_bytes() == b"mine"
    assert cli.main(["convert", str(finished[1]), str(dst), "--force"]) == 0
    assert set(load_safetensors(dst)[0]) == set(load_safetensors(finished[1] / "model.safetensors")[0])


# 3. convert RUN out.pt writes a .pt state_dict file


def test_convert_to_pt_writes_a_state_dict_file_that_init_reads(finished, tmp_path):
    torch = pytest.importorskip("torch")
    dst = tmp_path / "out.pt"
    assert cli.main(["convert", str(finished[1]), str(dst)]) == 0
    assert dst.is_file()
    sd = torch.load(str(dst), weights_only=True)
    ref = load_safetensors(finished[1] / "model.safetensors")[0]
    assert set(sd) == set(ref) and all(np.array_equal(sd[k].numpy(), ref[k]) for k in ref)
    assert cli.main(["convert", str(finished[1]), str(tmp_path / "out.bin")]) == 2


# 4. an advisory lock on the run directory


def test_a_second_run_on_the_same_directory_stops_naming_the_holder(finished, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from jaxrm.runlock import RunLock; "
            "lock = RunLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(600)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.time()
        assert cli.main(train_argv(finished[0], out)) == 2
        err = capsys.readouterr().err
        assert time.time() - started < 30
        assert str(out) in err and f"pid {holder.pid}" in err and socket.gethostname() in err
        assert not (out / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    assert cli.main(train_argv(finished[0], out)) == 0  # the OS released the dead holder's lock


# 5. resume refuses changed data (unless allowed) and a changed schedule


def test_resume_refuses_changed_data_unless_allowed(tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", n=40)
    out = tmp_path / "run"
    assert cli.main(train_argv(data, out)) == 0
    lines = open(data).read().splitlines()
    open(data, "w").write("\n".join(lines[:20]) + "\n")
    capsys.readouterr()
    assert cli.main(train_argv(data, out, "--max_steps=4", "--lr_decay_steps=2")) == 2
    err = capsys.readouterr().err
    assert "data" in err and "40 pairs" in err and "20 pairs" in err and "--allow-data-change" in err
    assert cli.main(train_argv(data, out, "--max_steps=4", "--lr_decay_steps=2", "--allow-data-change")) == 0
    assert "data changed, resuming anyway" in "".join(capsys.readouterr())


def test_resume_with_another_max_steps_refuses_a_changed_schedule(finished, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished[1], run)
    assert cli.main(train_argv(finished[0], run, "--max_steps=4")) == 2
    err = capsys.readouterr().err
    assert "max_steps" in err and "learning rate" in err and "--lr_decay_steps=2" in err
    assert cli.main(train_argv(finished[0], run, "--max_steps=4", "--lr_decay_steps=2")) == 0
    assert "max_steps 2 -> 4: the learning-rate schedule is unchanged" in "".join(capsys.readouterr())
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]


# 6. use_margins on data without margins


def test_use_margins_on_data_without_margins_is_an_error(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"chosen": f"a{i}!", "rejected": f"a{i}."}) + "\n" for i in range(8)))
    out = tmp_path / "run"
    assert cli.main(train_argv(data, out, "--use_margins=true")) == 2
    err = capsys.readouterr().err
    assert f"jaxrm train: error: {data}" in err and "margin" in err
    assert not out.exists()  # a failed run leaves no empty --out directory


# 7. exported weights get the umask's mode


def test_exported_weights_have_the_umasks_mode(finished, tmp_path):
    old = os.umask(0o022)
    try:
        assert cli.main(["convert", str(finished[1]), str(tmp_path / "w.safetensors")]) == 0
        assert cli.main(["convert", str(finished[1]), str(tmp_path / "hf"), "--to", "hf-seq-cls"]) == 0
    finally:
        os.umask(old)
    for path in (
        finished[1] / "model.safetensors",
        finished[1] / "config.json",
        tmp_path / "w.safetensors",
        tmp_path / "hf" / "model.safetensors",
    ):
        assert oct(path.stat().st_mode & 0o777) == oct(0o644), path


# 8. Ctrl-C at any moment of train: a clean message, exit 75


@pytest.mark.parametrize("when", ["importing", "compiling"])
def test_ctrl_c_at_any_moment_is_a_clean_message(finished, tmp_path, when):
    env = {**os.environ, "JAXRM_NO_TCMALLOC": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(__file__))
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxrm.cli", *train_argv(finished[0], tmp_path / "run", "--max_steps=500")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    seen = ""
    if when == "importing":
        time.sleep(1.5)  # python is up (the CLI records signals), jax still importing
    else:  # the data is loaded: the state's init and the first step compile next
        for line in proc.stderr:
            seen += line
            if line.startswith("train data"):
                break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = seen + err
    assert proc.returncode == 75, err
    assert "Traceback" not in err and "jaxrm train: " in err


# 9. the README's Python API example runs as pasted


def test_readme_python_api_example_runs():
    pytest.importorskip("torch")
    text = open(README).read()
    section = text.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)
    out, input_ids = namespace["out"], namespace["input_ids"]
    assert np.isfinite(float(out.loss)) and out.chosen_end_scores.shape == (input_ids.shape[0] // 2,)


# rough edges


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--learning_rate=-1"], "TrainConfig.learning_rate must be > 0, got -1.0"),
        (["--max_steps", "x"], "config key 'max_steps' needs a int"),  # `--key value` is read as --key=value
    ],
)
def test_bad_settings_name_the_right_key(finished, tmp_path, capsys, extra, message):
    assert cli.main(train_argv(finished[0], tmp_path / "run", *extra)) == 2
    assert f"jaxrm train: error: {message}" in capsys.readouterr().err


def test_corrupt_init_file_never_suggests_unsafe_loading(finished, tmp_path, capsys):
    pytest.importorskip("torch")
    bad = tmp_path / "w.pt"
    bad.write_bytes(b"\x80\x02not a pickle at all" * 10)
    assert cli.main(train_argv(finished[0], tmp_path / "run", "--init", str(bad))) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "weights_only=False" not in err


def test_score_reads_chats_and_input_errors_are_prefixed(finished, tmp_path, capsys):
    texts = tmp_path / "texts.jsonl"
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "fine!"}]
    texts.write_text(json.dumps({"messages": chat}) + "\n" + json.dumps("plain!") + "\n")
    assert cli.main(["score", str(finished[1]), "--input", str(texts)]) == 0
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["text"] for r in rows] == [chat, "plain!"] and "loaded" in err and "step 2" in err
    assert cli.main(["score", str(finished[1]), "--input", str(tmp_path / "none.jsonl")]) == 2
    assert "jaxrm score: error: --input" in capsys.readouterr().err


def test_rerunning_a_finished_run_says_no_step_ran(finished, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished[1], run)
    assert cli.main(train_argv(finished[0], run)) == 0
    out = capsys.readouterr().out
    assert "no step to train: the run was already at step 2" in out and "wall time" not in out
