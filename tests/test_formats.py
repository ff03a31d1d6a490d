"""Preference data formats (jaxrm/formats.py): JSON Lines, JSON, CSV, Parquet; explicit and
implicit prompts, chat messages, pre-tokenized ids, margins, configurable column names."""

import csv
import json

import numpy as np
import pytest

from jaxrm.data import encode_pairs
from jaxrm.formats import Columns, DataError, PreferencePair, load_pairs, split_common_prefix
from jaxrm.tokenizer import ByteTokenizer
from tests.conftest import EXPECTED, ROWS


def write(path, rows):
    fmt = path.name.split(".")[1]
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            for r in rows:
                w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    elif fmt == "parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


FORMATS = ["jsonl", "json", "csv", "parquet"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_explicit_prompt_each_format(tmp_path, fmt):
    pairs = load_pairs(write(tmp_path / f"d.{fmt}", ROWS))
    assert pairs == EXPECTED
    assert [p.line for p in pairs] == [1, 2]


def test_gzipped_json_and_csv(tmp_path):
    import gzip

    for fmt in ("json", "csv"):
        plain = write(tmp_path / f"d.{fmt}", ROWS)
        gz = tmp_path / f"d.{fmt}.gz"
        gz.write_bytes(gzip.compress(plain.read_bytes()))
        assert load_pairs(gz) == EXPECTED


def test_implicit_prompt_is_split_at_a_word_boundary():
    hh_c = "\n\nHuman: Is the sky blue?\n\nAssistant: Yes, it is."
    hh_r = "\n\nHuman: Is the sky blue?\n\nAssistant: No."
    assert split_common_prefix(hh_c, hh_r) == (
        "\n\nHuman: Is the sky blue?\n\nAssistant: ",
        "Yes, it is.",
        "No.",
    )
    # a shared start of a word stays in both answers
    assert split_common_prefix("Answer: great", "Answer: grim") == ("Answer: ", "great", "grim")
    assert split_common_prefix("abc", "abd") == ("", "abc", "abd")
    assert split_common_prefix("same text", "same text") == ("same ", "text", "text")


@pytest.mark.parametrize("fmt", FORMATS)
def test_implicit_prompt_each_format(tmp_path, fmt):
    rows = [
        {
            "chosen": "\n\nHuman: hi\n\nAssistant: hello there",
            "rejected": "\n\nHuman: hi\n\nAssistant: go away",
        }
    ]
    [pair] = load_pairs(write(tmp_path / f"hh.{fmt}", rows))
    assert pair == PreferencePair("\n\nHuman: hi\n\nAssistant: ", "hello there", "go away", None)
    # the split changes no token: the sequences are the full texts
    data, _ = encode_pairs([pair], ByteTokenizer(), seq_len=64, pad_id=256, vocab_size=257)
    assert bytes(data.chosen_ids[0, : data.chosen_lengths[0]].tolist()).decode() == rows[0]["chosen"]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_chat_messages(tmp_path, fmt):
    conv = [{"role": "user", "content": "hi"}]
    rows = [
        {
            "chosen": conv + [{"role": "assistant", "content": "hello"}],
            "rejected": conv + [{"role": "assistant", "content": "bye"}],
        }
    ]
    [pair] = load_pairs(write(tmp_path / f"chat.{fmt}", rows))
    assert pair == PreferencePair("\n\nHuman: hi\n\nAssistant: ", "hello", "bye", None)
    # TRL's conversational layout: prompt messages and answer messages apart
    rows = [
        {
            "prompt": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "assistant", "content": "bye"}],
        }
    ]
    [pair] = load_pairs(write(tmp_path / f"trl.{fmt}", rows))
    assert pair == PreferencePair(
        "\n\nSystem: be nice\n\nHuman: hi", "\n\nAssistant: hello", "\n\nAssistant: bye", None
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_pre_tokenized(tmp_path, fmt):
    rows = [{"input_ids_chosen": [5, 6, 7], "input_ids_rejected": [5, 6, 9, 10], "margin": 2.0}]
    pairs = load_pairs(write(tmp_path / f"ids.{fmt}", rows))
    assert (
        pairs[0].chosen_ids == (5, 6, 7) and pairs[0].rejected_ids == (5, 6, 9, 10) and pairs[0].margin == 2.0
    )
    data, _ = encode_pairs(pairs, ByteTokenizer(), seq_len=6, pad_id=256, vocab_size=257)
    np.testing.assert_array_equal(data.chosen_ids[0], [5, 6, 7, 256, 256, 256])
    np.testing.assert_array_equal(data.rejected_ids[0], [5, 6, 9, 10, 256, 256])
    bad = [{"input_ids_chosen": [5, 300], "input_ids_rejected": [5, 6]}]
    with pytest.raises(DataError, match=r"chosen has token id 300 outside \[0, 257\)"):
        encode_pairs(
            load_pairs(write(tmp_path / f"big.{fmt}", bad)),
            ByteTokenizer(),
            seq_len=6,
            pad_id=256,
            vocab_size=257,
        )


def test_pre_tokenized_bad_values_name_the_row(tmp_path):
    rows = [
        {"input_ids_chosen": [1], "input_ids_rejected": [2]},
        {"input_ids_chosen": [1, -4], "input_ids_rejected": [2]},
    ]
    with pytest.raises(DataError, match=r"ids\.json: row 2: 'input_ids_chosen' must be a non-empty list"):
        load_pairs(write(tmp_path / "ids.json", rows))
    with pytest.raises(DataError, match=r"half\.jsonl:1: missing key\(s\) 'input_ids_rejected'"):
        load_pairs(write(tmp_path / "half.jsonl", [{"input_ids_chosen": [1]}]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_configurable_column_names(tmp_path, fmt):
    rows = [{"question": "Q ", "good": "yes", "bad": "no", "weight": 3}]
    cols = Columns(prompt="question", chosen="good", rejected="bad", margin="weight")
    assert load_pairs(write(tmp_path / f"c.{fmt}", rows), cols) == [PreferencePair("Q ", "yes", "no", 3.0)]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_missing_column_lists_columns_found(tmp_path, fmt):
    rows = [{"prompt": "p", "chosen": "a", "rejectd": "b"}]
    with pytest.raises(
        DataError,
        match=r"m\.\w+: missing column\(s\) 'rejected'; columns found: "
        r"'prompt', 'chosen', 'rejectd'",
    ):
        load_pairs(write(tmp_path / f"m.{fmt}", rows))


@pytest.mark.parametrize("fmt", FORMATS)
def test_wrong_type_names_the_row(tmp_path, fmt):
    first = "1.0" if fmt == "parquet" else 1.0  # Parquet columns have one type
    rows = [
        {"chosen": "a", "rejected": "b", "margin": first},
        {"chosen": "a", "rejected": "b", "margin": "big"},
    ]
    where = "t.jsonl:2" if fmt == "jsonl" else f"t.{fmt}: row 2"
    with pytest.raises(DataError, match=rf"{where}: 'margin' must be a finite number, got 'big'"):
        load_pairs(write(tmp_path / f"t.{fmt}", rows))


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_bad_chat_message_names_the_row(tmp_path, fmt):
    rows = [{"chosen": [{"role": "user"}], "rejected": "x"}]
    with pytest.raises(
        DataError, match=r"'chosen' message 0 must be an object with string 'role' and 'content'"
    ):
        load_pairs(write(tmp_path / f"b.{fmt}", rows))
    rows = [{"chosen": "a", "rejected": "b"}, {"chosen": 7, "rejected": "b"}]
    where = "w.jsonl:2" if fmt == "jsonl" else "w.json: row 2"
    with pytest.raises(
        DataError, match=rf"{where}: 'chosen' must be a string or a list of chat messages, got int"
    ):
        load_pairs(write(tmp_path / f"w.{fmt}", rows))


def test_json_not_a_list(tmp_path):
    (tmp_path / "o.json").write_text(json.dumps({"chosen": "a", "rejected": "b"}))
    with pytest.raises(DataError, match=r"o\.json: expected a JSON list of objects"):
        load_pairs(tmp_path / "o.json")


@pytest.mark.parametrize("fmt", FORMATS)
def test_train_on_each_format(tmp_path, fmt):
    """`jaxrm train --data FILE` with renamed columns (TrainConfig *_key) and margins."""
    from jaxrm.cli import main

    rows = [{"q": f"Q{i}: ", "good": " yes good" * (1 + i % 3), "bad": " no bad", "m": 1.0} for i in range(8)]
    data = write(tmp_path / f"pairs.{fmt}", rows)
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--preset",
                "tiny",
                "--data",
                str(data),
                "--out",
                str(out),
                "--tokenizer=byte",
                "--vocab_size=257",
                "--d_model=32",
                "--dff=64",
                "--num_layer=1",
                "--seq_len=48",
                "--max_steps=2",
                "--batch_size=4",
                "--eval_every=2",
                "--checkpoint_every=2",
                "--prompt_key=q",
                "--chosen_key=good",
                "--rejected_key=bad",
                "--margin_key=m",
                "--use_margins=true",
            ]
        )
        == 0
    )
    assert (out / "model.safetensors").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m for m in metrics)


def test_runs_saved_before_the_column_keys_still_resume():
    """A checkpoint's config without the (newer) *_key fields matches a run with their defaults."""
    from jaxrm.config import run_preset
    from jaxrm.loop import config_differences

    run = run_preset("tiny")
    saved = run.to_dict()
    for key in (
        "prompt_key",
        "chosen_key",
        "rejected_key",
        "margin_key",
        "chosen_ids_key",
        "rejected_ids_key",
    ):
        del saved["train"][key]
    assert config_differences(saved, run) == []
    changed = run.override({"chosen_key": "good"})
    assert config_differences(saved, changed) == [
        "train.chosen_key: checkpoint has 'chosen', this run 'good'"
    ]


def test_truncation_left_cuts_the_shared_prompt_only():
    byte = ByteTokenizer()
    pairs = [
        PreferencePair("0123456789: ", "yes", "no!"),  # 15 tokens: cut 5 prompt tokens
        PreferencePair("ab", "0123456789yes", "9876543210no"),  # answers alone exceed 10: dropped
        PreferencePair("0123456789", "xyz", "xyz"),
    ]  # identical: dropped, never kept
    data, stats = encode_pairs(pairs, byte, seq_len=10, pad_id=256, vocab_size=257, truncation="left")
    assert stats["truncated_left"] == 1 and stats["dropped_too_long"] == 1 and stats["dropped_identical"] == 1
    assert bytes(data.chosen_ids[0, : data.chosen_lengths[0]].tolist()) == b"56789: yes"
    assert bytes(data.rejected_ids[0, : data.rejected_lengths[0]].tolist()) == b"56789: no!"
    # at least one shared token stays: cutting the whole prompt is a drop, not a pair diverging at 0
    data, stats = encode_pairs(
        [PreferencePair("abc", "0123456", "9876543")] + pairs[:1],
        byte,
        seq_len=7,
        pad_id=256,
        vocab_size=257,
        truncation="left",
    )
    assert stats["dropped_too_long"] == 1 and stats["truncated_left"] == 1
    assert data.chosen_ids[0, 0] == data.rejected_ids[0, 0]
    # the default still drops
    _, stats = encode_pairs(
        pairs[:1] * 2 + [PreferencePair("", "a", "b")], byte, seq_len=10, pad_id=256, vocab_size=257
    )
    assert stats["dropped_too_long"] == 2 and "truncated_left" not in stats
