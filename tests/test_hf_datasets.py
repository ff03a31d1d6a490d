"""Local Hugging Face `datasets` directories (Dataset / DatasetDict.save_to_disk) as preference data:
the same layouts as the files in tests/test_formats.py, built here, never downloaded."""

import json
import subprocess
import sys

import pytest

from jaxrm.formats import Columns, DataError, PreferencePair, load_pairs
from tests.conftest import EXPECTED, ROWS


def save(rows, path, **splits):
    """A Dataset of `rows` saved at `path`, or with splits={name: rows} a DatasetDict."""
    datasets = pytest.importorskip("datasets")
    if splits:
        datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(
            str(path)
        )
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def test_saved_dataset_explicit_prompt_and_margins(tmp_path):
    pairs = load_pairs(save(ROWS, tmp_path / "ds"))
    assert pairs == EXPECTED and [p.line for p in pairs] == [1, 2]


def test_saved_dataset_row_layouts(tmp_path):
    hh = [
        {
            "chosen": "\n\nHuman: hi\n\nAssistant: hello there",
            "rejected": "\n\nHuman: hi\n\nAssistant: go away",
        }
    ]
    assert load_pairs(save(hh, tmp_path / "hh")) == [
        PreferencePair("\n\nHuman: hi\n\nAssistant: ", "hello there", "go away", None)
    ]
    conv = [{"role": "user", "content": "hi"}]
    chat = [
        {
            "chosen": conv + [{"role": "assistant", "content": "hello"}],
            "rejected": conv + [{"role": "assistant", "content": "bye"}],
        }
    ]
    assert load_pairs(save(chat, tmp_path / "chat")) == [
        PreferencePair("\n\nHuman: hi\n\nAssistant: ", "hello", "bye", None)
    ]
    ids = [{"input_ids_chosen": [5, 6, 7], "input_ids_rejected": [5, 6, 9, 10], "margin": 2.0}]
    [pair] = load_pairs(save(ids, tmp_path / "ids"))
    assert pair.chosen_ids == (5, 6, 7) and pair.rejected_ids == (5, 6, 9, 10) and pair.margin == 2.0
    renamed = [{"question": "Q ", "good": "yes", "bad": "no", "weight": 3.0}]
    cols = Columns(prompt="question", chosen="good", rejected="bad", margin="weight")
    assert load_pairs(save(renamed, tmp_path / "renamed"), cols) == [PreferencePair("Q ", "yes", "no", 3.0)]


def test_dataset_dict_split_is_chosen_with_a_colon(tmp_path):
    test_rows = [{"prompt": "T ", "chosen": "a", "rejected": "b"}]
    path = save(None, tmp_path / "dd", train=ROWS, test=test_rows)
    assert load_pairs(f"{path}:train") == EXPECTED
    assert load_pairs(f"{path}:test") == [PreferencePair("T ", "a", "b", None)]
    assert load_pairs(path / "test") == [PreferencePair("T ", "a", "b", None)]  # a split's own directory
    with pytest.raises(
        DataError, match=r"dd: a DatasetDict with splits 'train', 'test': choose one as .*dd:SPLIT"
    ):
        load_pairs(path)
    with pytest.raises(DataError, match=r"no split 'validation'; choose one"):
        load_pairs(f"{path}:validation")
    only = save(None, tmp_path / "only", train=ROWS)
    assert load_pairs(only) == EXPECTED  # a single split needs no name
    with pytest.raises(DataError, match=r"a single Dataset \(no splits\), but split 'train' was asked for"):
        load_pairs(f"{save(ROWS, tmp_path / 'single')}:train")


def test_saved_dataset_bad_rows_are_named(tmp_path):
    with pytest.raises(
        DataError, match=r"m: missing column\(s\) 'rejected'; columns found: 'prompt', 'chosen', 'rejectd'"
    ):
        load_pairs(save([{"prompt": "p", "chosen": "a", "rejectd": "b"}], tmp_path / "m"))
    rows = [
        {"chosen": "a", "rejected": "b", "margin": "1.0"},
        {"chosen": "a", "rejected": "b", "margin": "big"},
    ]
    with pytest.raises(DataError, match=r"dd:train: row 2: 'margin' must be a finite number, got 'big'"):
        load_pairs(f"{save(None, tmp_path / 'dd', train=rows, test=rows)}:train")


def test_directories_that_are_not_datasets_and_a_missing_package(tmp_path, monkeypatch):
    (tmp_path / "plain").mkdir()
    with pytest.raises(
        DataError,
        match=r"plain: is a directory, not a pair file; a saved Hugging Face dataset "
        r"directory holds dataset_info.json",
    ):
        load_pairs(tmp_path / "plain")
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now fails, as when not installed
    with pytest.raises(
        DataError,
        match=r"saved: a saved Hugging Face dataset \(dataset_info.json\); reading it "
        r"needs the datasets package \(pip install datasets\)",
    ):
        load_pairs(saved)


def test_jaxrm_does_not_import_datasets_for_other_formats(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    code = (
        "import sys; import jaxrm.cli, jaxrm.loop, jaxrm.data; from jaxrm.formats import load_pairs; "
        f"load_pairs({str(data)!r}); assert 'datasets' not in sys.modules, 'datasets imported'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_train_and_eval_on_a_saved_dataset(tmp_path, capsys):
    """`jaxrm train --data DIR:train --eval_data DIR:test` with renamed columns and margins, then `eval`."""
    from jaxrm.cli import main

    rows = [{"q": f"Q{i}: ", "good": " yes good" * (1 + i % 3), "bad": " no bad", "m": 1.0} for i in range(8)]
    path = save(None, tmp_path / "prefs", train=rows, test=rows[:4])
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--preset",
                "tiny",
                "--data",
                f"{path}:train",
                f"--eval_data={path}:test",
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
    assert "validation: pairwise accuracy" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file()
    assert main(["eval", str(out), "--data", f"{path}:test", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pairs"] == 4
    assert (
        main(
            [
                "lint",
                f"{path}:train",
                "--tokenizer",
                "byte",
                "--column",
                "prompt=q",
                "--column",
                "chosen=good",
                "--column",
                "rejected=bad",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["pairs"] == 8
