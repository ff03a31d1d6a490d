"""K-wise rankings from the CLI: train with a ranking loss in every layout on a rankings file, eval
on rankings (the same numbers with and without --layout), pair losses on a rankings file (its
ordered pairs), and a pair-trained run evaluated on rankings."""

import json

import numpy as np
import pytest

from jaxrm import cli

WORDS = ["good", "fine", "ok", "nice", "meh", "sure", "well"]


def write_rankings(path, n=24, seed=0):
    """Prompts with 2-4 responses, one row form per line in turn; more '!' ranks better."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            k = 2 + i % 3
            body = " ".join(rng.choice(WORDS, size=rng.integers(1, 3)))
            bangs = rng.permutation(4)[:k]
            texts = [f" {body}" + "!" * int(b) + "." for b in bangs]
            if i % 3 == 0:
                order = np.argsort(-bangs, kind="stable")
                row = {"prompt": "Q:", "responses": [texts[j] for j in order]}
            elif i % 3 == 1:
                ranks = (-bangs).argsort().argsort() + 1
                answers = [{"answer": t, "rank": int(r)} for t, r in zip(texts, ranks)]
                row = {"prompt": "Q:", "answers": answers}
            else:
                row = {"prompt": "Q:", "completions": texts, "scores": [float(b) for b in bangs]}
            f.write(json.dumps(row) + "\n")
    return str(path)


def train_args(out, data, *extra):
    args = ["train", "--preset", "tiny", "--out", str(out), "--data", data, f"--eval_data={data}"]
    args += ["--tokenizer=byte", "--vocab_size=257", "--d_model=32", "--seq_len=32", "--batch_size=6"]
    return args + ["--max_steps=4", "--eval_every=4", *extra]


@pytest.mark.parametrize("layout", ["rows", "packed"])
def test_train_plackett_luce_then_eval_with_and_without_layout(tmp_path, capsys, layout):
    data = write_rankings(tmp_path / "rankings.jsonl")
    out = tmp_path / layout
    assert cli.main(train_args(out, data, "--loss_type=plackett_luce", f"--layout={layout}")) == 0
    printed = capsys.readouterr()
    assert "24 ranked prompts, 80 ordered pairs, K up to 4" in printed.out + printed.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["validation"]["prompts"] == 24 and summary["validation"]["pairs"] == 80
    assert (out / "normalization.json").exists()
    results = {}
    for eval_layout in (None, "rows", "shared", "packed"):
        extra = [] if eval_layout is None else ["--layout", eval_layout]
        assert cli.main(["eval", str(out), "--data", data, "--json", *extra]) == 0
        results[eval_layout] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("accuracy", "loss", "kendall_tau", "top1_accuracy"):
        assert abs(summary["validation"][key] - results[None][key]) <= 1e-6, key
        for eval_layout in ("rows", "shared", "packed"):
            assert abs(results[eval_layout][key] - results[None][key]) <= 1e-6, (eval_layout, key)
    assert results[None]["loss_type"] == "plackett_luce" and results[None]["max_k"] == 4
    assert cli.main(["eval", str(out), "--data", data]) == 0  # the table
    assert "kendall_tau" in capsys.readouterr().out


def test_pair_loss_on_rankings_trains_on_the_ordered_pairs(tmp_path, capsys):
    data = write_rankings(tmp_path / "rankings.jsonl")
    out = tmp_path / "pairs"
    assert cli.main(train_args(out, data, "--loss_type=last_token")) == 0
    printed = capsys.readouterr()
    assert "80 pairs from 24 rankings" in printed.out + printed.err
    assert json.loads((out / "summary.json").read_text())["validation"]["pairs"] == 80
    # the pair-trained run on the rankings file: the K-wise report, loss plackett_luce
    assert cli.main(["eval", str(out), "--data", data, "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["prompts"] == 24 and report["pairs"] == 80 and report["loss_type"] == "plackett_luce"


def test_ranking_run_refuses_accumulation_and_compare(tmp_path, capsys):
    data = write_rankings(tmp_path / "rankings.jsonl")
    args = train_args(tmp_path / "x", data, "--loss_type=all_pairs", "--grad_accum_steps=2")
    assert cli.main(args) == 2
    assert "grad_accum_steps=1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
