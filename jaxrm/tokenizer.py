"""Tokenizers: GPT-2 BPE from the bundled vocabulary, and a byte-level one.

Both are offline: the GPT-2 ranks are read from jaxrm/assets/gpt2.tiktoken (see
jaxrm/assets/README.md), never fetched. Interface shared by every tokenizer:
name, vocab_size, eot_id, encode(text) -> list[int], decode(ids) -> str.
Special tokens written in the text (e.g. "<|endoftext|>") are encoded as ordinary
text, never as the special id, so the pad/eot id can only come from the caller.
"""

from __future__ import annotations

import functools
import pathlib

ASSETS = pathlib.Path(__file__).resolve().parent / "assets"
GPT2_VOCAB_PATH = ASSETS / "gpt2.tiktoken"
# sha256 of the r50k_base / gpt2 ranks file (the value tiktoken itself pins for r50k_base)
GPT2_VOCAB_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenizer regex, in tiktoken's equivalent faster form (tiktoken_ext.openai_public.r50k_pat_str)
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT_TEXT = "<|endoftext|>"


@functools.lru_cache(maxsize=None)
def _gpt2_encoding():
    import tiktoken
    import tiktoken.load

    path = str(GPT2_VOCAB_PATH)
    assert "://" not in path  # tiktoken reads paths without a scheme with open(); nothing is fetched
    if not GPT2_VOCAB_PATH.is_file():
        raise FileNotFoundError(f"GPT-2 vocabulary missing: {path} (regenerate with scripts/build_assets.py)")
    ranks = tiktoken.load.load_tiktoken_bpe(path, expected_hash=GPT2_VOCAB_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                             special_tokens={EOT_TEXT: 50256})


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


TOKENIZERS = {"gpt2": GPT2Tokenizer, "byte": ByteTokenizer}


def get_tokenizer(name: str):
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; valid choices: {', '.join(sorted(TOKENIZERS))}")
    return TOKENIZERS[name]()
