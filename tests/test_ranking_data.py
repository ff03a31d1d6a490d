"""K-wise ranking data (jaxrm/ranking_formats.py, jaxrm/ranking_data.py): the row forms in each file
format, ties, chat messages, implicit prompts, pair rows as K = 2, bad rows, the ordered pairs of a
ranking, and encoding (duplicates, no preference, truncation, stats, offsets)."""

import csv
import json

import numpy as np
import pytest

from jaxrm.config import RunConfig, TrainConfig
from jaxrm.data import encode_pairs
from jaxrm.formats import Columns, DataError, PreferencePair, load_pairs, split_shared_prefix
from jaxrm.ranking_data import encode_rankings, load_ranking_split
from jaxrm.ranking_formats import Ranking, is_ranking_row, load_rankings, ranking_pairs, row_to_ranking
from jaxrm.tokenizer import get_tokenizer
from tests.conftest import MODEL

BYTE = get_tokenizer("byte")  # 257 ids, 256 = end-of-text = the tiny model's PAD
ENCODE = dict(seq_len=16, pad_id=256, vocab_size=257)

# one row of each form, and the rankings they hold
ROWS = [
    {"prompt": "Q: 1+1? ", "responses": ["2", "3", "22"], "subset": "math"},
    {
        "prompt": "Q: sky? ",
        "answers": [
            {"answer": "grey", "rank": 3, "model": "m1"},
            {"answer": "blue", "rank": 1, "model": "m2"},
            {"answer": "red", "rank": 7, "model": "m3"},
            {"answer": "navy", "rank": 3, "model": "m4"},
        ],
    },
    {"prompt": "Q: sea? ", "completions": ["wet", "dry", "salty"], "scores": [0.5, -1, 0.5]},
    {"prompt": "Q: sun? ", "chosen": "hot", "rejected": "cold", "margin": 2.0},
]
EXPECTED = [
    Ranking("Q: 1+1? ", ("2", "3", "22"), (1, 2, 3), subset="math"),
    Ranking("Q: sky? ", ("grey", "blue", "red", "navy"), (2, 1, 3, 2)),  # 3, 1, 7, 3 made dense
    Ranking("Q: sea? ", ("wet", "dry", "salty"), (1, 2, 1)),  # equal scores: a tie
    Ranking("Q: sun? ", ("hot", "cold"), (1, 2)),
]


def as_table(rows: list[dict]) -> list[dict]:
    """Every row with every row's columns, null where it has none (pyarrow and datasets take the
    first row's keys as the columns)."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k) for k in columns} for r in rows]


def write(path, rows):
    """rows as a file of path's format: .jsonl, .json, .parquet, or a saved datasets directory (.ds)."""
    fmt = path.name.split(".")[-1]
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(as_table(rows)), path)
    else:
        datasets = pytest.importorskip("datasets")
        datasets.Dataset.from_list(as_table(rows)).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "ds"])
def test_each_row_form_in_each_format(tmp_path, fmt):
    """Parquet and datasets tables hold every column in every row: null list columns are absent."""
    rankings = load_rankings(write(tmp_path / f"d.{fmt}", ROWS))
    assert rankings == EXPECTED
    assert [r.line for r in rankings] == [1, 2, 3, 4]
    assert [r.subset for r in rankings] == ["math", None, None, None]


def test_is_ranking_row():
    cols = Columns()
    assert [is_ranking_row(r, cols) for r in ROWS] == [True, True, True, False]
    assert not is_ranking_row({"responses": None, "chosen": "a", "rejected": "b"}, cols)


def test_renamed_columns(tmp_path):
    rows = [{"q": "Q ", "outs": ["a", "b"]}, {"q": "Q ", "cands": ["a", "b"], "s": [1, 2]}]
    cols = Columns(prompt="q", responses="outs", completions="cands", scores="s")
    assert load_rankings(write(tmp_path / "d.jsonl", rows), cols) == [
        Ranking("Q ", ("a", "b"), (1, 2)),
        Ranking("Q ", ("a", "b"), (2, 1)),
    ]


def test_chat_messages_with_and_without_a_prompt_column():
    cols = Columns()
    user = [{"role": "user", "content": "hi"}]
    said = lambda text: [{"role": "assistant", "content": text}]
    apart = {"prompt": user, "responses": [said("hello"), said("go"), "\n\nAssistant: bye"]}
    assert row_to_ranking(apart, "f:1", 1, cols) == Ranking(
        "\n\nHuman: hi", ("\n\nAssistant: hello", "\n\nAssistant: go", "\n\nAssistant: bye"), (1, 2, 3)
    )
    whole = {
        "answers": [{"answer": user + said("hello"), "rank": 2}, {"answer": user + said("hey"), "rank": 1}]
    }
    assert row_to_ranking(whole, "f:1", 1, cols) == Ranking(
        "\n\nHuman: hi\n\nAssistant: ", ("hello", "hey"), (2, 1)
    )


def test_implicit_prompt_is_the_prefix_all_k_texts_share_cut_at_a_word():
    assert split_shared_prefix(["Q: the cat", "Q: the car", "Q: a dog"]) == (
        "Q: ",
        ("the cat", "the car", "a dog"),
    )
    assert split_shared_prefix(["Q: cat", "Q: car", "Q: cab"]) == ("Q: ", ("cat", "car", "cab"))
    assert split_shared_prefix(["cat", "car"]) == ("", ("cat", "car"))
    row = {"completions": ["Q: x is 1", "Q: x is 2", "Q: x is 3"], "scores": [1, 3, 2]}
    assert row_to_ranking(row, "f:1", 1, Columns()) == Ranking("Q: x is ", ("1", "2", "3"), (3, 1, 2))


def test_pair_rows_are_k2_rankings_in_every_pair_layout(tmp_path):
    rows = [
        {"prompt": "Q ", "chosen": "yes", "rejected": "no"},
        {"chosen": "Q: is it? yes", "rejected": "Q: is it? no"},
        {"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]},
    ]
    assert load_rankings(write(tmp_path / "d.jsonl", rows)) == [
        Ranking("Q ", ("yes", "no"), (1, 2)),
        Ranking("Q: is it? ", ("yes", "no"), (1, 2)),
        Ranking("\n\nHuman: ", ("a", "b"), (1, 2)),
    ]


def test_csv_holds_pairs_only(tmp_path):
    good = tmp_path / "pairs.csv"
    good.write_text('prompt,chosen,rejected\n"Q ",yes,no\n')
    assert load_rankings(good) == [Ranking("Q ", ("yes", "no"), (1, 2))]
    bad = tmp_path / "ranked.csv"
    with open(bad, "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["prompt", "responses"], ["Q ", json.dumps(["a", "b"])]])
    with pytest.raises(
        DataError, match=r"ranked\.csv: column 'responses' holds lists.*JSON Lines, JSON or Parquet"
    ):
        load_rankings(bad)


def test_a_table_without_ranking_or_pair_columns_names_them(tmp_path):
    with pytest.raises(DataError, match=r"d\.parquet: missing column\(s\) 'chosen', 'rejected'"):
        load_rankings(write(tmp_path / "d.parquet", [{"prompt": "Q", "texts": ["a", "b"]}]))
    rows = [{"prompt": "Q", "completions": ["a", "b"]}]
    with pytest.raises(DataError, match=r"d\.parquet: column 'completions' needs a 'scores' column"):
        load_rankings(write(tmp_path / "d.parquet", rows))


BAD_ROWS = [
    ({"prompt": "Q", "responses": ["one"]}, r"'responses' has 1 response\(s\); a ranking needs at least 2"),
    ({"prompt": "Q", "responses": []}, r"'responses' has 0 response\(s\)"),
    ({"prompt": "Q", "responses": "a b"}, r"'responses' must be a list of K >= 2 responses, got str"),
    ({"prompt": "Q", "responses": ["a", 3]}, r"'responses\[1\]' must be a string or a list of chat messages"),
    (
        {"prompt": "Q", "responses": [[{"role": "user"}], "b"]},
        r"'responses\[0\]' message 0 must be an object",
    ),
    ({"prompt": 7, "responses": ["a", "b"]}, r"'prompt' must be a string or a list of chat messages"),
    (
        {"prompt": "Q", "answers": [{"answer": "a"}, {"answer": "b", "rank": 1}]},
        r"'answers\[0\]' must be an object with 'answer' and 'rank'",
    ),
    (
        {"prompt": "Q", "answers": [{"answer": "a", "rank": 1}, {"answer": "b", "rank": 1.5}]},
        r"'answers\[1\]\.rank' must be an integer >= 1",
    ),
    (
        {"prompt": "Q", "answers": [{"answer": "a", "rank": True}, {"answer": "b", "rank": 2}]},
        r"'answers\[0\]\.rank' must be an integer",
    ),
    (
        {"prompt": "Q", "answers": [{"answer": "a", "rank": 0}, {"answer": "b", "rank": 2}]},
        r"'answers\[0\]\.rank' must be an integer >= 1",
    ),
    (
        {"prompt": "Q", "answers": [{"answer": "a", "rank": "1"}, {"answer": "b", "rank": 2}]},
        r"'answers\[0\]\.rank' must be an integer",
    ),
    (
        {"prompt": "Q", "answers": [{"answer": 5, "rank": 1}, {"answer": "b", "rank": 2}]},
        r"'answers\[0\]\.answer' must be a string",
    ),
    ({"prompt": "Q", "completions": ["a", "b"]}, r"missing key 'scores'"),
    (
        {"prompt": "Q", "completions": ["a", "b"], "scores": [1, 2, 3]},
        r"'scores' must be a list of 2 numbers .*got 3 scores",
    ),
    (
        {"prompt": "Q", "completions": ["a", "b"], "scores": [1, float("nan")]},
        r"'scores\[1\]' must be a finite number, got nan",
    ),
    (
        {"prompt": "Q", "completions": ["a", "b"], "scores": [float("inf"), 1]},
        r"'scores\[0\]' must be a finite number, got inf",
    ),
    (
        {"prompt": "Q", "completions": ["a", "b"], "scores": ["high", 1]},
        r"'scores\[0\]' must be a finite number",
    ),
    ({"prompt": "Q", "responses": ["a", "b"], "answers": []}, r"the row has 'responses' and 'answers'"),
    ({"input_ids_chosen": [1, 2], "input_ids_rejected": [1, 3]}, r"a pre-tokenized pair"),
    ({"prompt": "Q", "texts": ["a", "b"]}, r"neither a ranking nor a pair.*keys found: 'prompt', 'texts'"),
    ({"prompt": "Q", "responses": ["a", "\ud800"]}, r"'responses\[1\]' is not valid Unicode"),
    (["Q", "a", "b"], r"expected a JSON object, got list"),
]


@pytest.mark.parametrize("row, message", BAD_ROWS)
def test_bad_rows_name_the_file_line_and_key(tmp_path, row, message):
    path = write(tmp_path / "d.jsonl", [ROWS[0], row])
    with pytest.raises(DataError, match=r"d\.jsonl:2: " + message):
        load_rankings(path)


def test_bad_rows_in_json_name_the_row(tmp_path):
    path = write(tmp_path / "d.json", [ROWS[0], {"prompt": "Q", "responses": ["one"]}])
    with pytest.raises(DataError, match=r"d\.json: row 2: 'responses' has 1 response"):
        load_rankings(path)


def test_ranking_invariants_are_checked():
    with pytest.raises(ValueError, match="K >= 2"):
        Ranking("Q", ("a",), (1,))
    with pytest.raises(ValueError, match="K >= 2"):
        Ranking("Q", ("a", "b"), (1,))
    with pytest.raises(ValueError, match="dense"):
        Ranking("Q", ("a", "b"), (1, 3))


def test_ranking_pairs_order_and_ties():
    tied = Ranking("P ", ("a", "b", "c"), (1, 2, 2), line=4, subset="s")  # b and c tied: 2 pairs
    plain = Ranking("R ", ("x", "y", "z"), (2, 1, 3), line=9)
    pairs = ranking_pairs([tied, plain])
    assert pairs == [
        PreferencePair("P ", "a", "b", subset="s"),
        PreferencePair("P ", "a", "c", subset="s"),
        PreferencePair("R ", "x", "z"),  # by (better index, worse index): (0, 2), (1, 0), (1, 2)
        PreferencePair("R ", "y", "x"),
        PreferencePair("R ", "y", "z"),
    ]
    assert [p.line for p in pairs] == [4, 4, 9, 9, 9]
    assert ranking_pairs([Ranking("Q", ("a", "b", "c"), (1, 1, 1))]) == []


# ----------------------------------------------------------------------------- encoding


def rows_of(data, i):
    """Prompt i's rows as (text, rank) (byte tokenizer: ids are bytes; PAD 256 ends a row)."""
    start, stop = data.offsets[i], data.offsets[i + 1]
    return [
        (bytes(data.ids[m, : data.lengths[m]].tolist()).decode(), int(data.ranks[m]))
        for m in range(start, stop)
    ]


def test_encoded_rows_offsets_and_varying_k():
    data, stats = encode_rankings(EXPECTED, BYTE, **ENCODE)
    assert len(data) == 4 and data.ids.shape == (12, 16) and data.ids.dtype == np.int32
    assert data.offsets.tolist() == [0, 3, 7, 10, 12] and data.group_sizes().tolist() == [3, 4, 3, 2]
    assert rows_of(data, 1) == [
        ("Q: sky? grey", 2),
        ("Q: sky? blue", 1),
        ("Q: sky? red", 3),
        ("Q: sky? navy", 2),
    ]
    assert rows_of(data, 3) == [("Q: sun? hot", 1), ("Q: sun? cold", 2)]
    assert (data.ids[np.arange(16)[None, :] >= data.lengths[:, None]] == 256).all()  # right-padded
    assert data.longest().tolist() == [10, 12, 13, 12]
    assert data.source_index.tolist() == [0, 1, 2, 3]
    assert stats == {
        "rankings_in": 4,
        "rankings_kept": 4,
        "responses_kept": 12,
        "ordered_pairs": 3 + 5 + 2 + 1,
        "dropped_duplicate_responses": 0,
        "dropped_no_preference": 0,
        "dropped_too_long": 0,
        "max_len": 13,
        "max_k": 4,
    }
    assert stats["ordered_pairs"] == len(ranking_pairs(EXPECTED))


def test_pair_rows_encode_as_encode_pairs_does(tmp_path):
    rows = [{"prompt": "Q ", "chosen": "yes", "rejected": "no"}, {"chosen": "Q: a b", "rejected": "Q: a c"}]
    path = write(tmp_path / "d.jsonl", rows)
    ranked, _ = encode_rankings(load_rankings(path), BYTE, **ENCODE)
    pairs, _ = encode_pairs(load_pairs(path), BYTE, **ENCODE)
    starts = ranked.offsets[:-1]
    np.testing.assert_array_equal(ranked.ids[starts], pairs.chosen_ids)
    np.testing.assert_array_equal(ranked.ids[starts + 1], pairs.rejected_ids)
    assert ranked.ranks.tolist() == [1, 2, 1, 2]


def test_duplicates_keep_the_better_ranked_copy_and_ranks_stay_dense():
    ranking = Ranking("Q", (" x", " y", " x", " z"), (3, 4, 1, 2))
    data, stats = encode_rankings([ranking], BYTE, **ENCODE)
    assert rows_of(data, 0) == [("Q y", 3), ("Q x", 1), ("Q z", 2)]
    assert stats["dropped_duplicate_responses"] == 1 and stats["ordered_pairs"] == 3


def test_prompts_without_a_preference_are_dropped():
    rankings = [
        Ranking("Q", (" a", " a"), (1, 2)),  # one response left
        Ranking("Q", (" a", " b", " c"), (1, 1, 1)),  # all tied
        Ranking("Q", (" a", " b", " a"), (1, 2, 2)),  # a kept at rank 1
    ]
    data, stats = encode_rankings(rankings, BYTE, **ENCODE)
    assert data.source_index.tolist() == [2] and rows_of(data, 0) == [("Q a", 1), ("Q b", 2)]
    assert stats["dropped_no_preference"] == 2 and stats["dropped_duplicate_responses"] == 2
    with pytest.raises(DataError, match=r"<rankings>: no rankings left after filtering"):
        encode_rankings(rankings[:2], BYTE, **ENCODE)


def test_too_long_prompts_drop_error_or_cut_on_the_left():
    long_prompt = Ranking("0123456789abc ", ("x", "yy", "z"), (1, 2, 3), line=7)  # 16 tokens at most
    fits = Ranking("Q ", ("x", "y"), (2, 1))
    answers_too_long = Ranking("Q ", ("x" * 15, "y"), (1, 2))
    settings = dict(ENCODE, seq_len=12)
    data, stats = encode_rankings([long_prompt, fits, answers_too_long], BYTE, **settings)
    assert data.source_index.tolist() == [1] and stats["dropped_too_long"] == 2
    with pytest.raises(DataError, match=r"<rankings>:7 \(ranking 0\): 16 tokens > seq_len 12"):
        encode_rankings([long_prompt], BYTE, truncation="error", **settings)
    data, stats = encode_rankings([long_prompt, fits, answers_too_long], BYTE, truncation="left", **settings)
    assert data.source_index.tolist() == [0, 1]
    assert rows_of(data, 0) == [
        ("456789abc x", 1),
        ("456789abc yy", 2),
        ("456789abc z", 3),
    ]  # 4 cut from each
    assert stats["truncated_left"] == 1 and stats["dropped_too_long"] == 1 and stats["max_len"] == 12
    no_prompt_left = Ranking("abcdefgh ", ("x" * 12, "y"), (1, 2))  # the cut (9) would take the whole prompt
    with pytest.raises(DataError, match="no rankings left"):
        encode_rankings([no_prompt_left], BYTE, truncation="left", **settings)


def test_bad_sequences_name_the_ranking_and_the_response():
    where = r"src:3 \(ranking 0\): "
    bad = lambda *responses: [Ranking("", responses, tuple(range(1, len(responses) + 1)), line=3)]
    with pytest.raises(DataError, match=where + "prompt \\+ response 1 encodes to zero tokens"):
        encode_rankings(bad("a", ""), BYTE, source="src", **ENCODE)
    with pytest.raises(DataError, match=where + r"response 1 has token id 122 outside \[0, 100\)"):
        encode_rankings(bad("a", "z"), BYTE, source="src", seq_len=16, pad_id=0, vocab_size=100)
    with pytest.raises(DataError, match=where + "response 2 contains the pad id 98 at token 0"):
        encode_rankings(bad("a", "c", "b"), BYTE, source="src", seq_len=16, pad_id=98, vocab_size=257)
    data, _ = encode_rankings(
        bad("a", "c", "b"), BYTE, seq_len=16, pad_id=98, vocab_size=257, lengths="explicit"
    )
    assert data.lengths.tolist() == [1, 1, 1]
    with pytest.raises(DataError, match=where + r"response 1: text is not valid Unicode"):
        encode_rankings(bad("a", "\ud800"), BYTE, source="src", **ENCODE)


def test_load_ranking_split_uses_the_runs_columns_and_settings(tmp_path):
    rows = [{"prompt": "Q ", "ranked": [{"answer": "a", "rank": 2}, {"answer": "b", "rank": 1}]}]
    run = RunConfig(MODEL, TrainConfig(tokenizer="byte", seq_len=24, answers_key="ranked"))
    data, stats = load_ranking_split(run, BYTE, str(write(tmp_path / "d.jsonl", rows)), "train data")
    assert data.ids.shape == (2, 24) and data.ranks.tolist() == [2, 1] and stats["rankings_kept"] == 1
    tied = [{"prompt": "Q ", "ranked": [{"answer": "a", "rank": 1}, {"answer": "b", "rank": 1}]}]
    with pytest.raises(DataError, match=r"train data: no rankings left"):
        load_ranking_split(run, BYTE, str(write(tmp_path / "tied.jsonl", tied)), "train data")
