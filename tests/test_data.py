import gzip
import json

import numpy as np
import pytest

from jaxrm.data import BatchIterator, EncodedPairs, bundled_data_path, encode_pairs, eval_batches
from jaxrm.formats import DataError, PreferencePair, load_pairs
from jaxrm.tokenizer import ByteTokenizer, GPT2Tokenizer

BYTE = ByteTokenizer()


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def make_pairs(n):
    # pair i: chosen " c<i>", rejected " r<i>" with byte ids that identify the pair
    return [PreferencePair("P:", f" c{i:03d}", f" r{i:03d}", margin=float(i)) for i in range(n)]


def encode_bytes(pairs, seq_len=12):
    return encode_pairs(pairs, BYTE, seq_len=seq_len, pad_id=256, vocab_size=257)


def pair_id(row):  # "P: c<ddd>": the 3 digits after " c" / " r" in a byte-encoded row
    return int(bytes(row[4:7].tolist()).decode())


# ----------------------------------------------------------------------------- load_pairs


def test_load_plain_and_gz(tmp_path):
    lines = [
        json.dumps({"prompt": "Q:", "chosen": " yes", "rejected": " no", "margin": 2}),
        "",  # blank lines are skipped
        json.dumps({"chosen": "a", "rejected": "b"}),
    ]
    plain = write_lines(tmp_path / "p.jsonl", lines)
    gz = tmp_path / "p.jsonl.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    for path in (plain, gz):
        pairs = load_pairs(path)
        assert pairs == [PreferencePair("Q:", " yes", " no", 2.0), PreferencePair("", "a", "b", None)]
        assert [p.line for p in pairs] == [1, 3]


def test_malformed_json_names_file_and_line(tmp_path):
    good = json.dumps({"chosen": "a", "rejected": "b"})
    path = write_lines(tmp_path / "bad.jsonl", [good, "", '{"chosen": "a", "rejected": '])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        load_pairs(path)


def test_missing_key_lists_keys_found(tmp_path):
    path = write_lines(
        tmp_path / "d.jsonl",
        [
            json.dumps({"chosen": "a", "rejected": "b"}),
            json.dumps({"prompt": "p", "chosen": "a", "rejectd": "b"}),
        ],
    )
    with pytest.raises(DataError) as e:
        load_pairs(path)
    msg = str(e.value)
    assert "d.jsonl:2" in msg and "'rejected'" in msg and "'rejectd'" in msg and "'prompt'" in msg


@pytest.mark.parametrize(
    "obj, match",
    [
        ({"chosen": 1, "rejected": "b"}, "'chosen' must be a string"),
        ({"chosen": "a", "rejected": "b", "prompt": None}, "'prompt' must be a string"),
        ({"chosen": "a", "rejected": "b", "margin": "big"}, "'margin' must be a finite number"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_bad_values_name_line(tmp_path, obj, match):
    path = write_lines(tmp_path / "v.jsonl", [json.dumps({"chosen": "a", "rejected": "b"}), json.dumps(obj)])
    with pytest.raises(DataError, match=r"v\.jsonl:2: " + match):
        load_pairs(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        load_pairs(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"empty\.jsonl: empty file"):
        load_pairs(write_lines(tmp_path / "empty.jsonl", ["", "  "]))
    assert issubclass(DataError, ValueError)


# ----------------------------------------------------------------------------- encode_pairs


def test_encode_shapes_padding_and_stats():
    pairs = make_pairs(3) + [
        PreferencePair("P:", " same", " same"),  # identical -> dropped
        PreferencePair("P:", " far too long for twelve", " x"),
    ]  # too long -> dropped
    data, stats = encode_bytes(pairs)
    assert stats == {
        "pairs_in": 5,
        "pairs_kept": 3,
        "dropped_too_long": 1,
        "dropped_identical": 1,
        "with_margin": 3,  # the kept pairs that carry a margin (make_pairs gives each one)
        "max_len": 7,
    }
    assert len(data) == 3 and data.chosen_ids.shape == (3, 12) and data.chosen_ids.dtype == np.int32
    assert list(data.chosen_ids[1]) == list(b"P: c001") + [256] * 5
    assert list(data.rejected_ids[2, :7]) == list(b"P: r002")
    assert data.chosen_lengths.tolist() == [7, 7, 7] and data.rejected_lengths.dtype == np.int32
    assert data.margins.tolist() == [0.0, 1.0, 2.0] and data.margins.dtype == np.float32


def test_encode_too_long_error_names_line():
    pairs = [PreferencePair("", "ok", "no"), PreferencePair("", "x" * 20, "y", line=7)]
    with pytest.raises(DataError, match=r"f\.jsonl:7 \(pair 1\): 20 tokens > seq_len 12"):
        encode_pairs(
            pairs, BYTE, seq_len=12, pad_id=256, vocab_size=257, truncation="error", source="f.jsonl"
        )


def test_pad_inside_text_rejected():
    pairs = make_pairs(2) + [PreferencePair("", " fine", " has x inside")]
    with pytest.raises(DataError, match=r"pair 2: rejected contains the pad id 120"):
        encode_pairs(pairs, BYTE, seq_len=20, pad_id=ord("x"), vocab_size=257)


def test_gpt2_endoftext_text_is_not_pad():
    data, stats = encode_pairs(
        [PreferencePair("Q:", " a <|endoftext|>", " b")],
        GPT2Tokenizer(),
        seq_len=16,
        pad_id=50256,
        vocab_size=50257,
    )
    assert stats["pairs_kept"] == 1 and 50256 not in data.chosen_ids[0, : data.chosen_lengths[0]]


def test_out_of_vocab_and_empty_rejected():
    with pytest.raises(DataError, match=r"pair 0: chosen has token id \d+ outside \[0, 257\)"):
        encode_pairs(
            [PreferencePair("", " the end", " b")], GPT2Tokenizer(), seq_len=8, pad_id=256, vocab_size=257
        )
    with pytest.raises(DataError, match="pair 1: prompt \\+ chosen encodes to zero tokens"):
        encode_bytes(make_pairs(1) + [PreferencePair("", "", "b")])
    with pytest.raises(DataError, match="no pairs left after filtering"):
        encode_bytes([PreferencePair("", "same", "same")])


# ----------------------------------------------------------------------------- batches


@pytest.fixture(scope="module")
def data10():
    data, _ = encode_bytes(make_pairs(10))
    return data


def test_batch_layout_chosen_then_rejected(data10):
    batch = next(BatchIterator(data10, 4, seed=0))
    ids = batch["input_ids"]
    assert ids.shape == (8, 12) and ids.dtype == np.int32 and batch["lengths"].shape == (8,)
    assert all(bytes(row[2:4].tolist()) == b" c" for row in ids[:4]) and all(
        bytes(row[2:4].tolist()) == b" r" for row in ids[4:]
    )
    chosen, rejected = [pair_id(r) for r in ids[:4]], [pair_id(r) for r in ids[4:]]
    assert chosen == rejected  # row i and row B+i are the same pair
    assert batch["margins"].tolist() == [float(i) for i in chosen]


def test_batch_order_is_the_documented_permutation(data10):
    it = BatchIterator(data10, 3, seed=5)
    seen = [
        [pair_id(r) for r in next(it)["input_ids"][:3]] for _ in range(6)
    ]  # 3 batches per epoch, 2 epochs
    for e in range(2):
        perm = np.random.default_rng([5, e]).permutation(10)
        assert sum(seen[3 * e : 3 * e + 3], []) == perm[:9].tolist()  # drop_last: the 10th pair is skipped
    assert it.state() == {"epoch": 1, "index": 9}
    assert seen[:3] != [[pair_id(r) for r in next(BatchIterator(data10, 3, seed=6))["input_ids"][:3]]] * 3


def test_batch_iterator_deterministic_and_resumable(data10):
    a, b = BatchIterator(data10, 3, seed=1), BatchIterator(data10, 3, seed=1)
    stream = [next(a)["input_ids"] for _ in range(8)]
    assert all(np.array_equal(x, next(b)["input_ids"]) for x in stream)
    it = BatchIterator(data10, 3, seed=1)
    for _ in range(4):
        next(it)
    state = json.loads(json.dumps(it.state()))  # JSON round trip, as a checkpoint would
    resumed = BatchIterator(data10, 3, seed=1)
    resumed.restore(state)
    assert all(np.array_equal(stream[k], next(resumed)["input_ids"]) for k in range(4, 8))
    with pytest.raises(DataError, match="bad data iterator state"):
        resumed.restore({"epoch": 0})


def test_no_shuffle_keep_last_and_too_big_batch(data10):
    it = BatchIterator(data10, 4, seed=0, shuffle=False, drop_last=False)
    sizes = [len(next(it)["margins"]) for _ in range(4)]
    assert sizes == [4, 4, 2, 4] and it.state() == {"epoch": 1, "index": 4}
    with pytest.raises(DataError, match="batch_size 11 must be between 1 and the number of pairs \\(10\\)"):
        BatchIterator(data10, 11, seed=0)


def test_eval_batches_cover_every_pair_once(data10):
    batches = list(eval_batches(data10, 4))
    assert len(batches) == 3
    assert all(b["input_ids"].shape == (8, 12) and b["valid"].shape == (4,) for b in batches)
    ids = [pair_id(r) for b in batches for r, v in zip(b["input_ids"][:4], b["valid"]) if v]
    assert ids == list(range(10))
    last = batches[-1]
    assert last["valid"].tolist() == [True, True, False, False]
    assert np.array_equal(last["input_ids"][2], data10.chosen_ids[0])  # filler = pair 0
    assert np.array_equal(last["input_ids"][6], data10.rejected_ids[0])


# ----------------------------------------------------------------------------- bundled data


def test_bundled_splits_load_and_are_disjoint():
    with pytest.raises(ValueError, match="train, validation, test"):
        bundled_data_path("dev")
    texts = {}
    for split in ("train", "validation", "test"):
        pairs = load_pairs(bundled_data_path(split))
        assert len(pairs) > (20000 if split == "train" else 2000)
        assert all(
            p.prompt == "Sentence:" and p.chosen.startswith(" ") and p.rejected.startswith(" ") for p in pairs
        )
        assert all(p.chosen != p.rejected and p.margin >= 1.0 for p in pairs)
        assert not any("<|endoftext|>" in p.chosen + p.rejected for p in pairs)
        texts[split] = {p.chosen for p in pairs} | {p.rejected for p in pairs}
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]


def test_bundled_validation_fits_100_gpt2_tokens():
    pairs = load_pairs(bundled_data_path("validation"))
    data, stats = encode_pairs(pairs, GPT2Tokenizer(), seq_len=100, pad_id=50256, vocab_size=50257)
    assert stats["pairs_kept"] == len(pairs) and isinstance(data, EncodedPairs)
    assert data.chosen_ids[0, 0] == GPT2Tokenizer().encode("Sentence:")[0]


def varied_lengths(n=96, seed=0):
    rng = np.random.default_rng(seed)
    pairs = [
        PreferencePair("P:", " " + "a" * int(rng.integers(1, 40)), " " + "b" * int(rng.integers(1, 40)))
        for _ in range(n)
    ]
    return encode_pairs(pairs, ByteTokenizer(), seq_len=48, pad_id=256, vocab_size=257)[0]


def test_group_by_length_visits_every_pair_once_with_similar_lengths():
    data = varied_lengths()
    longest = np.maximum(data.chosen_lengths, data.rejected_lengths)
    grouped = BatchIterator(data, 8, seed=3, group_by_length=4, pad_multiple=16)
    plain = BatchIterator(data, 8, seed=3)
    assert sorted(grouped.order(0).tolist()) == list(range(len(data)))
    assert grouped.order(0).tolist() != grouped.order(1).tolist()
    spread = lambda it: np.mean([np.ptp(longest[it.order(0)[i : i + 8]]) for i in range(0, len(data), 8)])
    assert spread(grouped) < 0.5 * spread(plain)


def test_pad_multiple_trims_each_batch_to_its_longest_pair():
    data = varied_lengths()
    it = BatchIterator(data, 8, seed=1, group_by_length=4, pad_multiple=16)
    widths = set()
    for _ in range(24):
        batch = next(it)
        T = batch["input_ids"].shape[1]
        widths.add(T)
        assert T % 16 == 0 and batch["lengths"].max() <= T < batch["lengths"].max() + 16
        assert (batch["input_ids"][np.arange(16), batch["lengths"] - 1] != 256).all()  # last real token kept
    assert len(widths) > 1


def test_grouped_iterator_restores_the_same_stream():
    data = varied_lengths()
    a = BatchIterator(data, 8, seed=5, group_by_length=4, pad_multiple=16)
    for _ in range(15):
        next(a)
    b = BatchIterator(data, 8, seed=5, group_by_length=4, pad_multiple=16)
    b.restore(a.state())
    for _ in range(10):
        np.testing.assert_array_equal(next(a)["input_ids"], next(b)["input_ids"])
