"""Scoring a prompt with several responses, the prompt encoded once (jaxrm.score.score_responses,
Scorer.score_shared, `jaxrm score --input` {"prompt", "responses"} lines and --responses): the
same rewards as scoring each prompt + response text alone, within 1e-5; rows split when the
responses do not fit one; truncation and the input errors."""

import json

import numpy as np
import pytest
from flax import nnx

from jaxrm import cli, rundir
from jaxrm.config import RunConfig, TrainConfig
from jaxrm.formats import render_chat
from jaxrm.model import RewardModel
from jaxrm.score import (
    Normalization,
    ScoreInputError,
    score_responses,
    score_texts,
    shared_prefix_rows,
    write_normalization,
)
from tests.conftest import MODEL  # block_size 64, byte tokenizer ids

RUN = RunConfig(MODEL, TrainConfig(tokenizer="byte", data="pairs.jsonl"))  # --data run: no default prompt
PROMPT = "Q: which one is best? "  # 22 bytes
RESPONSES = ["A: this one", "A: that", "A: neither of them, sorry", "A", "B: " + "x" * 30, "ok!"]


@pytest.fixture(scope="module")
def model():
    return RewardModel(MODEL, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("score") / "run"
    path.mkdir()
    rundir.write_config(path, RUN)
    rundir.export_weights(path, model)
    write_normalization(path, Normalization(mean=0.25, std=0.5, count=10, source="test"))
    return path


def test_shared_prefix_rows_split_responses_that_do_not_fit_one_row():
    sequences = [[1, 2, 3, 4, 5], [1, 2, 3, 6], [1, 2, 3, 7, 8, 9], [1, 2, 9]]
    groups = shared_prefix_rows(sequences, max_len=9)
    # the prefix: their common tokens [1, 2]; rows of at most 9 tokens: 2 + 3 + 2, then 2 + 4 + 1
    assert [g[2] for g in groups] == [2, 2]
    assert [[s.tolist() for s in g[1]] for g in groups] == [[[3, 4, 5], [3, 6]], [[3, 7, 8, 9], [9]]]
    one = shared_prefix_rows([[4, 5, 6]], max_len=9)  # one response: all but its last token shared
    assert one[0][0].tolist() == [4, 5] and [s.tolist() for s in one[0][1]] == [[6]]


def test_score_responses_equal_scoring_each_text_alone(model):
    expected = score_texts(model, RUN, [PROMPT + r for r in RESPONSES])
    # 22 + 11 + 7 + 25 + 1 + 33 + 3 bytes: the responses need three rows of block_size 64
    assert len(shared_prefix_rows([list((PROMPT + r).encode()) for r in RESPONSES], 64)) == 3
    np.testing.assert_allclose(score_responses(model, RUN, PROMPT, RESPONSES), expected, atol=1e-5)
    single = score_responses(model, RUN, "", ["just one text"])
    np.testing.assert_allclose(single, score_texts(model, RUN, ["just one text"]), atol=1e-5)


def test_over_long_responses_cut_the_prompt_from_the_left_or_are_refused(model):
    prompt, responses = (
        "P" * 40 + ": ",
        ["short", "y" * 30, "z" * 70],
    )  # 47, 72 and 112 tokens with the prompt
    expected = score_texts(model, RUN, [prompt + r for r in responses])  # the last 64 tokens of each
    np.testing.assert_allclose(score_responses(model, RUN, prompt, responses), expected, atol=1e-5)
    with pytest.raises(ScoreInputError, match="response 1 has 72 tokens, more than the limit 64"):
        score_responses(model, RUN, prompt, responses, truncation="error")
    with pytest.raises(ScoreInputError, match="no responses"):
        score_responses(model, RUN, prompt, [])


def cli_lines(capsys, *argv) -> list[dict]:
    assert cli.main(["score", *map(str, argv)]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_cli_input_prompt_with_responses_one_line_each_in_order(model, run_dir, tmp_path, capsys):
    chat = [{"role": "user", "content": "hi"}]
    path = tmp_path / "in.jsonl"
    lines = [
        "plain text!",
        {"prompt": PROMPT, "responses": RESPONSES},
        {"prompt": chat, "responses": ["fine", [{"role": "assistant", "content": "ok"}]]},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = cli_lines(capsys, run_dir, "--input", path)
    assert [set(o) for o in out] == [{"text", "reward"}, {"prompt", "responses", "rewards"}] + [
        {"prompt", "responses", "rewards"}
    ]
    assert out[1]["prompt"] == PROMPT and out[1]["responses"] == RESPONSES and out[2]["prompt"] == chat
    alone = cli_lines(capsys, run_dir, "--prompt", "", *[PROMPT + r for r in RESPONSES])
    np.testing.assert_allclose(out[1]["rewards"], [o["reward"] for o in alone], atol=1e-5)
    chats = [
        render_chat(chat, "", "") + "fine",
        render_chat(chat + [{"role": "assistant", "content": "ok"}], "", ""),
    ]
    np.testing.assert_allclose(out[2]["rewards"], score_texts(model, RUN, chats), atol=1e-5)
    by_flag = cli_lines(capsys, run_dir, "--prompt", PROMPT, "--responses", *RESPONSES)
    assert by_flag[0]["prompt"] == PROMPT and by_flag[0]["responses"] == RESPONSES
    np.testing.assert_allclose(by_flag[0]["rewards"], out[1]["rewards"], atol=1e-6)
    normalized = cli_lines(capsys, run_dir, "--normalize", "--clip", "-1", "1", "--input", path)
    expected = np.clip((np.asarray(out[1]["rewards"]) - 0.25) / 0.5, -1, 1)
    np.testing.assert_allclose(normalized[1]["rewards"], expected, atol=1e-5)
    assert abs(normalized[0]["reward"] - np.clip((out[0]["reward"] - 0.25) / 0.5, -1, 1)) < 1e-5


@pytest.mark.parametrize(
    "line, message",
    [
        ({"prompt": "P" * 40, "responses": ["ok", "y" * 30]}, "in.jsonl:2: response 1 has 70 tokens"),
        ({"prompt": "Q", "responses": []}, 'in.jsonl:2: "responses" must be a non-empty list'),
        ({"prompt": 3, "responses": ["a"]}, "in.jsonl:2: prompt must be a string or a list of chat"),
        ({"prompt": "Q", "responses": ["a", {"x": 1}]}, "in.jsonl:2: response 1 must be a string"),
    ],
)
def test_cli_input_errors_name_the_line_and_response(run_dir, tmp_path, capsys, line, message):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps("fine") + "\n" + json.dumps(line) + "\n")
    assert cli.main(["score", str(run_dir), "--truncation", "error", "--input", str(path)]) == 2
    assert f"jaxrm score: error: {path.parent}/{message}" in capsys.readouterr().err


def test_cli_responses_flag_is_not_mixed_with_texts(run_dir, capsys):
    assert cli.main(["score", str(run_dir), "a text", "--responses", "x", "y"]) == 2
    assert "--responses takes the responses to --prompt" in capsys.readouterr().err
