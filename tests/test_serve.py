"""`jaxrm serve` as a real process on a free loopback port, talked to over HTTP; score / eval
--normalize and --write-normalization; normalization at the end of training; the HF export fields."""

import concurrent.futures
import contextlib
import io
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
from flax import nnx

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from jaxrm import cli, rundir  # noqa: E402
from jaxrm.config import RunConfig, TrainConfig  # noqa: E402
from jaxrm.model import RewardModel  # noqa: E402
from jaxrm.score import (  # noqa: E402
    NORMALIZATION,
    Normalization,
    Scorer,
    read_normalization,
    write_normalization,
)
from jaxrm.tokenizer import get_tokenizer  # noqa: E402
from tests.conftest import MODEL, make_run, write_pairs  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT = 60  # seconds per HTTP call
SHORT = ["good!!", "meh.", "ok", "well well!"]
TEXTS = ["good!!", "meh.", "a much longer text, " * 5 + "well!", "ok", "x" * 100]  # the last over max_len 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_run_dir(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """A run directory with a random MODEL (byte tokenizer) and a normalization.json."""
    path.mkdir(parents=True, exist_ok=True)
    rundir.write_config(path, RunConfig(MODEL, TrainConfig(tokenizer="byte", data="pairs.jsonl")))
    rundir.export_weights(path, RewardModel(MODEL, rngs=nnx.Rngs(seed)))
    write_normalization(path, Normalization(mean=0.25, std=0.5, count=10, source="test"))
    return path


@contextlib.contextmanager
def server(source, *args):
    """`jaxrm serve SOURCE ARGS` on a free loopback port: (base url, process); stopped at the end."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "jaxrm.cli", "serve", str(source), "--port", str(port), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited {proc.returncode}: {proc.stdout.read()}")
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(url + "/health", timeout=5).status_code == 200:
                    break
            assert time.monotonic() < deadline, "server did not start within 120 s"
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def cli_score(run_dir, texts, *flags) -> list[float]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["score", str(run_dir), "--prompt", "", *flags, *texts]) == 0
    return [json.loads(line)["reward"] for line in out.getvalue().splitlines()]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    run_dir = make_run_dir(tmp_path_factory.mktemp("serve") / "run")
    key_file = run_dir.parent / "key.txt"
    key_file.write_text(KEY + "\n")
    flags = ["--max-batch", "8", "--max-len", "64", "--api-key-file", str(key_file)]
    flags += ["--max-texts", "16", "--max-body-bytes", "4000", "--max-wait-ms", "20"]
    with server(run_dir, *flags) as (url, proc):
        yield run_dir, url


def post(url, path, body, headers=AUTH, **kw):
    return requests.post(url + path, json=body, headers=headers, timeout=TIMEOUT, **kw)


def test_get_reward_equals_jaxrm_score(served):
    run_dir, url = served
    expected = cli_score(run_dir, TEXTS)
    r = post(url, "/get_reward", {"query": TEXTS, "prompts": ["p"] * len(TEXTS), "labels": [0] * len(TEXTS)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"rewards", "scores", "extra_logs"}
    np.testing.assert_allclose(body["rewards"], expected, atol=1e-6, rtol=0)
    assert body["scores"] == body["rewards"]
    assert body["extra_logs"]["raw_reward"] == body["rewards"]  # not normalized: raw
    r = post(url, "/score", {"texts": TEXTS})
    assert r.json()["normalized"] is False and r.json()["truncated"] == 2  # the two texts over 64 bytes
    np.testing.assert_allclose(r.json()["rewards"], expected, atol=1e-6, rtol=0)


def test_score_forms_agree(served):
    run_dir, url = served
    expected = cli_score(run_dir, ["Q: good!!", "Q: meh."])
    by_prompt = post(url, "/score", {"prompt": "Q: ", "responses": ["good!!", "meh."]}).json()["rewards"]
    ids = [list(b"Q: good!!"), list(b"Q: meh.")]
    by_ids = post(url, "/score", {"input_ids": ids}).json()["rewards"]
    np.testing.assert_allclose(by_prompt, expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(by_ids, expected, atol=1e-6, rtol=0)


def test_openrlhf_style_client(served):
    """One text per request, 24 concurrent (OpenRLHF's remote client), then the old query-only form."""
    run_dir, url = served
    texts = [("good " * (i % 9)) + "!" * (i % 4) + str(i) for i in range(24)]  # mixed lengths
    expected = cli_score(run_dir, texts)
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda t: post(url, "/get_reward", {"query": [t], "prompts": [""]}), texts))
    assert all(a.status_code == 200 for a in answers)
    got = [a.json()["rewards"][0] for a in answers]
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    old = post(url, "/get_reward", {"query": texts[:16]}).json()["rewards"]  # --max-texts 16
    np.testing.assert_allclose(old, expected[:16], atol=1e-6, rtol=0)


def test_concurrent_requests_come_back_in_order(served):
    """Requests of different sizes and lengths at once: each caller gets its own rewards, in order."""
    run_dir, url = served
    requests_ = [[f"{'x' * (3 * i + j)}{j}" for j in range(1 + i % 5)] for i in range(12)]
    expected = cli_score(run_dir, [t for req in requests_ for t in req])
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda texts: post(url, "/score", {"texts": texts}), requests_))
    got = [r for a in answers for r in a.json()["rewards"]]
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    info = requests.get(url + "/info", headers=AUTH, timeout=TIMEOUT).json()
    assert info["batches"] < info["texts"]  # dynamic batching merged texts of several requests


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        ("/get_reward", b"{not json", 400, "malformed JSON"),
        ("/get_reward", [1, 2], 400, "must be a JSON object"),
        ("/get_reward", {"prompts": ["a"]}, 400, '"query" must be a list of strings, got NoneType'),
        ("/get_reward", {"query": "a text"}, 400, '"query" must be a list of strings, got str'),
        ("/get_reward", {"query": []}, 400, '"query" is empty'),
        ("/get_reward", {"query": ["ok", 3]}, 400, '"query"[1] must be a string, got int'),
        ("/get_reward", {"query": ["ok", ""]}, 400, '"query": text 1 is empty'),
        ("/get_reward", {"query": ["t"] * 17}, 413, "17 texts, more than the limit 16"),
        ("/get_reward", {"query": ["y" * 5000]}, 413, "over the limit of 4000 bytes"),
        ("/score", {"input_ids": [[1, 2], [3, 999]]}, 400, "sequence 1 holds token id 999"),
        ("/score", {"input_ids": [[1, 256]]}, 400, "sequence 0 holds token id 256"),  # the PAD id
        ("/score", {"input_ids": [[1, True]]}, 400, '"input_ids"[0] must be a list of integer'),
        ("/score", {"prompt": 3, "responses": ["a"]}, 400, '"prompt" must be a string'),
        ("/score", {"text": ["a"]}, 400, 'expected "texts", "input_ids"'),
    ],
)
def test_bad_input_answers_and_server_survives(served, path, body, status, message):
    _, url = served
    if isinstance(body, bytes):
        r = requests.post(url + path, data=body, headers=AUTH, timeout=TIMEOUT)
    else:
        r = post(url, path, body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert post(url, "/get_reward", {"query": ["still fine"]}).status_code == 200


def test_api_key(served):
    _, url = served
    assert post(url, "/get_reward", {"query": ["a"]}, headers={}).status_code == 401
    wrong = post(url, "/get_reward", {"query": ["a"]}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "api key" in wrong.json()["error"]
    assert post(url, "/get_reward", {"query": ["a"]}, headers={"X-API-Key": KEY}).status_code == 200
    assert requests.get(url + "/health", timeout=TIMEOUT).status_code == 200  # public
    assert requests.get(url + "/info", timeout=TIMEOUT).status_code == 401


def test_info(served):
    _, url = served
    info = requests.get(url + "/info", headers=AUTH, timeout=TIMEOUT).json()
    assert info["model"]["vocab_size"] == 257 and info["pad_id"] == 256 and info["tokenizer"] == "byte"
    assert info["max_len"] == 64 and info["length_buckets"] == [32, 48, 64]
    assert info["batch_buckets"] == [1, 2, 4, 8]
    shapes = {f"{R}x{W}" for R in info["batch_buckets"] for W in info["length_buckets"]}
    assert set(info["call_ms"]) == shapes and min(info["call_ms"].values()) > 0  # every shape timed
    assert info["normalization"]["mean"] == 0.25 and info["normalize"] is False
    assert info["version"] and info["compile_s"] > 0


def test_normalize_clip_truncation_error_and_sigterm(tmp_path):
    """--normalize/--clip match score --normalize/--clip; --truncation=error refuses an over-long
    text; SIGTERM with requests in flight answers them and exits 0."""
    run_dir = make_run_dir(tmp_path / "run", seed=1)
    raw = cli_score(run_dir, SHORT)
    expected = cli_score(run_dir, SHORT, "--normalize", "--clip", "-1", "1")
    np.testing.assert_allclose(expected, np.clip((np.asarray(raw) - 0.25) / 0.5, -1, 1), atol=1e-6)
    flags = "--max-batch 64 --max-len 64 --truncation error --normalize --clip -1 1".split()
    timed = lambda texts: (post(url, "/score", {"texts": texts}), time.monotonic())  # noqa: E731
    with server(run_dir, *flags, "--max-wait-ms", "1500", "--max-idle-ms", "1500") as (
        url,
        proc,
    ):  # waits 1.5 s
        body = post(url, "/get_reward", {"query": SHORT}).json()
        np.testing.assert_allclose(body["rewards"], expected, atol=1e-6, rtol=0)
        np.testing.assert_allclose(body["extra_logs"]["raw_reward"], raw, atol=1e-6, rtol=0)
        r = post(url, "/get_reward", {"query": ["ok", "x" * 100]})
        assert r.status_code == 400 and "text 1 has 100 tokens, more than the limit 64" in r.json()["error"]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            inflight = [pool.submit(timed, [t] * 2) for t in SHORT * 2]
            time.sleep(0.5)  # all 8 requests sent, their texts waiting in the batcher
            assert proc.poll() is None
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            answers = [f.result() for f in inflight]
        assert proc.wait(timeout=60) == 0
    assert all(answered > signalled for _, answered in answers)  # in flight when SIGTERM came
    assert all(a.status_code == 200 and len(a.json()["rewards"]) == 2 for a, _ in answers)
    got = [a.json()["rewards"][0] for a, _ in answers]
    np.testing.assert_allclose(got, expected * 2, atol=1e-6, rtol=0)


def test_serve_hf_export(tmp_path):
    """A transformers GPT2ForSequenceClassification directory (our export, with OpenRLHF's
    normalization fields) served directly: same rewards as the run it came from."""
    run_dir = make_run_dir(tmp_path / "run", seed=2)
    out = tmp_path / "hf"
    assert cli.main(["convert", str(run_dir), str(out), "--to", "hf-seq-cls"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["normalize_reward"], config["mean"], config["std"]) == (True, 0.25, 0.5)
    assert read_normalization(out) == Normalization(0.25, 0.5, 0, str(out / "config.json"))
    # the HF directory has no tokenizer.json: the gpt2 tokenizer; ids in, so the tokenizer does not matter
    ids = [list(b"Q: good!!"), list(b"Q: meh.")]
    expected = cli_score(run_dir, ["Q: good!!", "Q: meh."])
    with server(out, "--max-batch", "2", "--max-len", "32") as (url, _):
        got = post(url, "/score", {"input_ids": ids}, headers={}).json()["rewards"]
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def test_serve_refuses_bad_sources(tmp_path):
    run_dir = make_run_dir(tmp_path / "run")
    (run_dir / NORMALIZATION).unlink()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "jaxrm.cli", "serve", *map(str, a)], env=env, capture_output=True, text=True
    )
    missing = run(run_dir, "--normalize", "--port", free_port())
    assert missing.returncode == 2 and "--write-normalization" in missing.stderr
    hf = tmp_path / "lm"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    lm = run(hf, "--port", free_port())
    assert lm.returncode == 2 and "GPT2ForSequenceClassification with one label" in lm.stderr


def test_scorer_truncates_from_the_left():
    model = RewardModel(MODEL, rngs=nnx.Rngs(0))
    scorer = Scorer(model, get_tokenizer("byte"), max_len=32, max_batch=4)
    ids, truncated = scorer.encode(["a" * 10 + "b" * 32, "short"])
    assert truncated == 1 and ids[0] == list(b"b" * 32)
    full = Scorer(model, get_tokenizer("byte"), max_batch=4)
    assert scorer.score(ids) == pytest.approx(full.score([list(b"b" * 32), list(b"short")]), abs=1e-6)


def test_training_and_eval_write_normalization(tmp_path):
    """fit writes normalization.json from the validation rewards; eval --write-normalization
    rewrites it from another data set; score --normalize uses it."""
    from jaxrm.loop import fit

    run = make_run(tmp_path, max_steps=2, checkpoint_every=2, eval_every=2, warmup_steps=1, lr_decay_steps=2)
    out = tmp_path / "run"
    fit(run, out, log=lambda *_: None)
    norm = read_normalization(out)
    assert norm.count > 48 and norm.std > 0 and norm.source == run.train.eval_data
    other = write_pairs(tmp_path / "other.jsonl", n=16, seed=3)
    assert cli.main(["eval", str(out), "--data", other, "--write-normalization", "--json"]) == 0
    again = read_normalization(out)
    assert again.source == other and again.mean != norm.mean
    pairs = [json.loads(line) for line in pathlib.Path(other).read_text().splitlines()]
    texts = [p["prompt"] + p[k] for k in ("chosen", "rejected") for p in pairs]  # no pair is identical
    rewards = cli_score(out, texts)
    assert again.count == len(texts) == 32
    assert again.mean == pytest.approx(np.mean(rewards), abs=1e-5)
    assert again.std == pytest.approx(np.std(rewards), abs=1e-5)
    normalized = cli_score(out, texts, "--normalize")
    np.testing.assert_allclose(normalized, (np.asarray(rewards) - again.mean) / again.std, atol=1e-5)


class _RecordingScorer:
    """Stands in for Scorer in the Batcher: one call per gathered batch, the reward = length."""

    def __init__(self):
        self.calls = []

    def plan(self, sequences):
        return [[[i] for i in range(len(sequences))]]

    def run_rows(self, rows):
        self.calls.append(len(rows))
        return [float(len(row[0])) for row in rows]


def test_batcher_waits_for_company_only_after_callers_came_together():
    """A lone caller's text runs at once; a request's texts are one batch; after a batch of several
    texts the next waits for company, and stops waiting when none arrived for idle_gap_s (the burst
    is over), not at max_wait_s; a batch of one turns the waiting off again."""
    from jaxrm.serve import Batcher

    scorer = _RecordingScorer()
    batcher = Batcher(scorer, max_batch=8, max_wait_s=30.0, idle_gap_s=1.0)

    def answered(*requests, apart=0.0):  # (rewards, seconds until all are answered)
        started, futures = time.monotonic(), []
        for i, request in enumerate(requests):
            time.sleep(apart if i else 0.0)
            futures += batcher.submit(request)
        rewards = [f.result(timeout=60) for f in futures]
        return rewards, time.monotonic() - started

    batcher.start()
    try:
        rewards, seconds = answered([[1, 2, 3]])
        assert rewards == [3.0] and seconds < 0.8  # alone: no wait for company
        assert answered([[1]] * 5)[0] == [1.0] * 5 and scorer.calls == [1, 5]  # one request, one batch
        rewards, seconds = answered([[1, 1]], [[2]], apart=0.3)  # callers together: they wait for each other
        assert rewards == [2.0, 1.0] and scorer.calls == [1, 5, 2] and 1.0 <= seconds < 20
        rewards, seconds = answered([[4, 4, 4, 4]])  # still waits for company, then goes alone
        assert rewards == [4.0] and scorer.calls[-1] == 1 and 1.0 <= seconds < 20
        rewards, seconds = answered([[5]])
        assert seconds < 0.8 and scorer.calls[-1] == 1  # after a lone batch: no wait again
    finally:
        batcher.stop()
