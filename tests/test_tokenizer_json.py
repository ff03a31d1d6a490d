"""A Hugging Face tokenizer.json from a local path (the `tokenizers` package)."""

import json

import pytest

from jaxrm.tokenizer import get_tokenizer

tokenizers = pytest.importorskip("tokenizers")

WORDS = ["[UNK]", "hello", "world", "good", "bad", "answer", "Q", ":"]


def make_tokenizer_json(path, extra_words=()):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(WORDS + list(extra_words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path))
    return path


def test_tokenizer_json_encodes_decodes(tmp_path):
    tok = get_tokenizer(str(make_tokenizer_json(tmp_path / "tokenizer.json")))
    assert tok.vocab_size == len(WORDS) + 1 and tok.eot_id == len(WORDS)
    assert tok.encode("hello world good") == [1, 2, 3]
    assert tok.encode("hello zzz") == [1, 0]
    assert tok.decode([1, 2]) == "hello world"


def test_tokenizer_json_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json: no such tokenizer file"):
        get_tokenizer(str(tmp_path / "nope.json"))
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(ValueError, match="broken.json: not a readable tokenizer.json"):
        get_tokenizer(str(tmp_path / "broken.json"))
    with pytest.raises(ValueError, match="unknown tokenizer 'gpt5'.*tokenizer.json"):
        get_tokenizer("gpt5")


def _pairs(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {"prompt": "Q : ", "chosen": "good answer" + " good" * (i % 3), "rejected": "bad answer"}
            )
            + "\n"
            for i in range(8)
        )
    )
    return data


def test_train_with_tokenizer_json(tmp_path, capsys):
    from jaxrm.cli import main

    path = make_tokenizer_json(tmp_path / "tokenizer.json", extra_words=[f"w{i}" for i in range(40)])
    vocab = len(WORDS) + 40 + 1
    common = [
        "train",
        "--preset",
        "tiny",
        "--data",
        str(_pairs(tmp_path)),
        f"--tokenizer={path}",
        "--d_model=32",
        "--dff=64",
        "--num_layer=1",
        "--seq_len=16",
        "--max_steps=2",
        "--batch_size=4",
        "--eval_every=2",
        "--checkpoint_every=2",
    ]
    # a model vocabulary smaller than the tokenizer's is refused, saying what to set
    assert main(common + ["--out", str(tmp_path / "small"), f"--vocab_size={vocab - 10}"]) == 2
    assert (
        f"has {vocab} ids but the model's vocab_size is {vocab - 10}; set vocab_size >= {vocab}"
        in capsys.readouterr().err
    )
    # one more id than the tokenizer: PAD (vocab_size - 1) is never a real token
    assert main(common + ["--out", str(tmp_path / "ok"), f"--vocab_size={vocab + 1}"]) == 0
    assert (tmp_path / "ok" / "model.safetensors").is_file()
