"""Tokenizers: GPT-2 BPE from the bundled vocabulary, a byte-level one, and a local HF tokenizer.json.

Both are offline: the GPT-2 ranks are read from jaxrm/assets/gpt2.tiktoken (see
jaxrm/assets/README.md), never fetched. Interface shared by every tokenizer:
name, vocab_size, eot_id, encode(text) -> list[int], decode(ids) -> str.
Special tokens written in the text (e.g. "<|endoftext|>") are encoded as ordinary
text, never as the special id, so the pad/eot id can only come from the caller.
"""

from __future__ import annotations

import functools
import pathlib

import numpy as np

ASSETS = pathlib.Path(__file__).resolve().parent / "assets"
GPT2_VOCAB_PATH = ASSETS / "gpt2.tiktoken"
# sha256 of the r50k_base / gpt2 ranks file (the value tiktoken itself pins for r50k_base)
GPT2_VOCAB_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenizer regex, in tiktoken's equivalent faster form (tiktoken_ext.openai_public.r50k_pat_str)
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT_TEXT = "<|endoftext|>"


@functools.cache
def _gpt2_encoding():
    import tiktoken
    import tiktoken.load

    path = str(GPT2_VOCAB_PATH)
    assert "://" not in path  # tiktoken reads paths without a scheme with open(); nothing is fetched
    if not GPT2_VOCAB_PATH.is_file():
        raise FileNotFoundError(f"GPT-2 vocabulary missing: {path} (regenerate with scripts/build_assets.py)")
    ranks = tiktoken.load.load_tiktoken_bpe(path, expected_hash=GPT2_VOCAB_SHA256)
    return tiktoken.Encoding(
        name="gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks, special_tokens={EOT_TEXT: 50256}
    )


class GPT2Tokenizer:
    """GPT-2 byte-level BPE (50257 ids; 50256 is <|endoftext|>)."""

    name = "gpt2"
    vocab_size = 50257
    eot_id = 50256

    def __init__(self):
        self._enc = _gpt2_encoding()
        assert self._enc.n_vocab == self.vocab_size

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)  # no special tokens, ever

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids])


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; id 256 is end-of-text / padding."""

    name = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizer.json` from a local path, through the `tokenizers` package.

    vocab_size counts added tokens; eot_id is the first of <|endoftext|>, </s>, <eos>, <|eot_id|>,
    <|im_end|> the file defines (None if none). No special tokens are added around the text
    (add_special_tokens=False), but added/special tokens written in the text are matched by the
    tokenizers library: a PAD id inside a text is then reported by the data checks.
    """

    EOT_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eot_id|>", "<|im_end|>")

    def __init__(self, path):
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such tokenizer file")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValueError(
                f"{path}: reading a tokenizer.json needs the tokenizers package (pip install tokenizers)"
            ) from None
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None
        self.name = str(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eot_id = next((i for i in map(self._tok.token_to_id, self.EOT_NAMES) if i is not None), None)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


TOKENIZERS = {"gpt2": GPT2Tokenizer, "byte": ByteTokenizer}


def first_out_of_range(ids, vocab_size: int) -> tuple[int, ...] | None:
    """The first token id outside [0, vocab_size) in row-major order, as (row, col, id) for 2-D ids
    ((col, id) for 1-D); None when every id is in range. The one range check of model, loss, data, score."""
    ids = np.asarray(ids)
    bad = (ids < 0) | (ids >= vocab_size)
    if not bad.any():
        return None
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    return (*index, int(ids[index]))


def get_tokenizer(name: str):
    """ "gpt2", "byte", or the path of a Hugging Face tokenizer.json."""
    if name in TOKENIZERS:
        return TOKENIZERS[name]()
    if name.endswith(".json") or pathlib.Path(name).is_file():
        return HFTokenizer(name)
    raise ValueError(
        f"unknown tokenizer {name!r}; valid choices: {', '.join(sorted(TOKENIZERS))}, "
        f"or the path of a tokenizer.json"
    )
