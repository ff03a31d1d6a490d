import socket

import pytest

from jaxrm import tokenizer as tokmod
from jaxrm.tokenizer import ByteTokenizer, GPT2Tokenizer, get_tokenizer

UNICODE = "Héllo wörld — 日本語, emoji 🤗!\n\ttabs  and   spaces, it's 1234567 $3.50 "


@pytest.fixture(scope="module")
def gpt2():
    return GPT2Tokenizer()


def test_gpt2_known_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" the") == [262]
    assert gpt2.encode("!") == [0]
    assert gpt2.encode("Hello, my dog is cute") == [15496, 11, 616, 3290, 318, 13779]
    assert (gpt2.vocab_size, gpt2.eot_id, gpt2.name) == (50257, 50256, "gpt2")
    assert gpt2.decode([50256]) == "<|endoftext|>"


def test_gpt2_round_trip_unicode(gpt2):
    ids = gpt2.encode(UNICODE)
    assert gpt2.decode(ids) == UNICODE
    assert all(0 <= i < 50256 for i in ids)


def test_gpt2_special_text_is_ordinary_text(gpt2):
    text = "a <|endoftext|> b"
    ids = gpt2.encode(text)
    assert 50256 not in ids
    assert gpt2.encode("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]
    assert gpt2.decode(ids) == text


def test_gpt2_loads_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tokenizer tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    tokmod._gpt2_encoding.cache_clear()
    try:
        assert GPT2Tokenizer().encode("Hello world") == [15496, 995]
    finally:
        tokmod._gpt2_encoding.cache_clear()


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode(UNICODE)
    assert ids == list(UNICODE.encode("utf-8"))
    assert tok.encode("é") == [195, 169]
    assert tok.decode(ids) == UNICODE
    assert tok.decode(ids + [tok.eot_id]) == UNICODE  # eot / pad is not text
    assert (tok.vocab_size, tok.eot_id, tok.name) == (257, 256, "byte")


def test_get_tokenizer():
    assert isinstance(get_tokenizer("gpt2"), GPT2Tokenizer)
    assert isinstance(get_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ValueError, match="byte.*gpt2"):
        get_tokenizer("gpt3")
