"""`jaxrm lint DATA`: counts and first offending rows for each check."""

import json

from jaxrm.cli import main


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


ROWS = [
    {"prompt": "P: ", "chosen": "a", "rejected": "b"},  # 1 fine
    {"prompt": "P: ", "chosen": "same", "rejected": "same"},  # 2 identical
    {"prompt": "P: ", "chosen": "long-x", "rejected": "long-y"},  # 3 same first 8 tokens, too long
    {"prompt": "", "chosen": "x", "rejected": "y"},  # 4 divergence at 0
    {"prompt": "P: ", "chosen": "", "rejected": "b"},  # 5 empty answer
    {"input_ids_chosen": [80, 256, 2], "input_ids_rejected": [80, 3]},  # 6 end-of-text inside
    {"input_ids_chosen": [80, 299], "input_ids_rejected": [80, 3]},  # 7 PAD (vocab 300 - 1) inside
    {"input_ids_chosen": [80, 400], "input_ids_rejected": [80, 3]},  # 8 out of vocabulary
    {"prompt": "P: ", "chosen": "a", "rejected": "b"},  # 9 duplicate of 1
]


def test_lint_report_counts_and_first_rows(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    other = write_jsonl(tmp_path / "test.jsonl", [{"prompt": "P: ", "chosen": "b", "rejected": "zz"}])
    code = main(
        [
            "lint",
            data,
            "--tokenizer",
            "byte",
            "--seq-len",
            "8",
            "--vocab-size",
            "300",
            "--against",
            other,
            "--json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 1  # PAD inside a text / out-of-vocabulary ids: training would refuse the data
    expected = {
        "identical": [2],
        "identical_after_truncation": [3],
        "too_long": [3],
        "divergence_at_0": [4],
        "empty_answer": [5],
        "eot_in_text": [6],
        "pad_in_text": [7],
        "out_of_vocab": [8],
        "duplicate": [9],
        "empty_sequence": [],
        "in_other_file": [1, 5, 9],
    }
    for name, rows in expected.items():
        check = report["checks"][name]
        assert check == {"count": len(rows), "first": [f"{data}:{r}" for r in rows]}, name
    assert report["pairs"] == 9
    assert report["trainable_pairs"] == 9 - 4  # minus identical (2), too long (3), PAD (7), out of vocab (8)
    assert report["tokens_per_pair"]["max"] == len("P: long-x") and report["tokens_per_pair"]["min"] == 1


def test_lint_clean_file_prints_a_table(tmp_path, capsys):
    data = write_jsonl(tmp_path / "ok.csv.jsonl", ROWS[:1])
    assert main(["lint", data, "--tokenizer", "byte"]) == 0
    out = capsys.readouterr().out
    assert "1 pairs, 1 trainable at seq_len 96" in out and "ok    divergence_at_0" in out


def test_lint_column_names(tmp_path, capsys):
    data = write_jsonl(tmp_path / "c.jsonl", [{"good": "P: a", "bad": "P: b"}])
    assert (
        main(
            [
                "lint",
                data,
                "--tokenizer",
                "byte",
                "--column",
                "chosen=good",
                "--column",
                "rejected=bad",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["pairs"] == 1
    assert main(["lint", data, "--tokenizer", "byte"]) == 2  # default names: a DataError naming the keys
    assert "missing key(s) 'chosen', 'rejected'; keys found: 'good', 'bad'" in capsys.readouterr().err


def test_lint_reads_a_rankings_file_as_its_ordered_pairs(tmp_path, capsys):
    rows = [
        {"prompt": "P: ", "responses": ["a", "b", "c"]},  # 3 ordered pairs
        {"prompt": "P: ", "answers": [{"answer": "x", "rank": 1}, {"answer": "x", "rank": 2}]},  # identical
    ]
    data = write_jsonl(tmp_path / "r.jsonl", rows)
    assert main(["lint", data, "--tokenizer", "byte", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["from_rankings"] == 2 and report["pairs"] == 4 and report["trainable_pairs"] == 3
    assert main(["lint", data, "--tokenizer", "byte"]) == 0
    assert "4 pairs (the ordered pairs of 2 rankings), 3 trainable" in capsys.readouterr().out
