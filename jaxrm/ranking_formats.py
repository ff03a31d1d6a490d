"""K-wise rankings in the files users have -> Ranking lists (load_rankings); the ordered pairs a
ranking holds (ranking_pairs). The files are those of jaxrm/formats.py (JSON Lines, JSON, Parquet,
saved Hugging Face datasets directories; CSV for plain pairs only: its cells cannot hold lists).

Rows (column names configurable, see Columns / TrainConfig.*_key); a row with a responses,
answers or completions column is a ranking, any other row a pair:
    responses           {"prompt": "Q: ...", "responses": [best, second, ..., worst]}
        ranks 1..K in list order, no ties;
    Nectar              {"prompt": "...", "answers": [{"answer": "...", "rank": 1, "model": ...}, ...]}
        rank 1 is best; ranks are whole numbers >= 1 (1.0 reads as 1; booleans and 1.5 are
        refused); equal ranks are a tie; gaps are closed (ranks 1, 3, 3, 7 -> 1, 2, 2, 3);
        other keys of an answer are ignored;
    scores              {"prompt": "...", "completions": [...], "scores": [0.9, 0.1, ...]}
        a higher score is better; equal scores are a tie; scores are finite numbers, one per
        completion;
    a pair row          whatever jaxrm/formats.py reads as a pair (explicit / implicit prompt,
        chat messages, margin, subset) -> K = 2, ranks (1, 2) for (chosen, rejected); its margin is
        not used; pre-tokenized pair rows are refused (rankings are text).
Every response (and the prompt) is a string or a list of chat messages, rendered as for pairs
(CHAT_TEMPLATE). Without a prompt column the prompt is the longest prefix all K rendered
responses share, cut back to position 0 or to just after a whitespace character. K may differ
from row to row; "subset" labels rankings as it labels pairs.

Ties are never ordered at random: tied responses carry no preference between each other
(ranking_pairs skips their pairs; jaxrm/ranking.py's losses treat them as one group), and they
still rank above every worse response and below every better one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from jaxrm.formats import (
    Columns,
    DataError,
    PreferencePair,
    RowKind,
    load_pairs,
    load_rows,
    pair_rows,
    row_to_pair,
    split_shared_prefix,
    subset_label,
    text_field,
    text_value,
)


@dataclass(frozen=True)
class Ranking:
    prompt: str
    responses: tuple[str, ...]  # in the file's order
    ranks: tuple[int, ...]  # one per response; 1 = best; equal ranks = a tie; dense (1, 2, 3 ... no gaps)
    line: int | None = field(default=None, compare=False, repr=False)  # 1-based line (JSONL) or row
    subset: str | None = field(default=None, compare=False)  # the "subset" column: a label for eval

    def __post_init__(self):
        if len(self.responses) < 2 or len(self.ranks) != len(self.responses):
            raise ValueError(
                f"a Ranking needs K >= 2 responses and one rank each, got {len(self.responses)} "
                f"responses and {len(self.ranks)} ranks"
            )
        if sorted(set(self.ranks)) != list(range(1, max(self.ranks) + 1)):
            raise ValueError(f"Ranking.ranks must be dense, 1 = best (1, 2, ... no gaps), got {self.ranks}")


def ranking_columns(cols: Columns) -> tuple[str, str, str]:
    """The list columns that make a row a ranking: responses, answers (Nectar), completions."""
    return cols.responses, cols.answers, cols.completions


def is_ranking_row(obj: dict, cols: Columns) -> bool:
    """Whether the row has a responses / answers / completions column (else it is a pair row); a
    null there (a Parquet table mixing pair and ranking rows) counts as absent."""
    return bool(_present_lists(obj, cols))


def _present_lists(obj, cols: Columns) -> list[str]:
    """The ranking list columns the row has (not null)."""
    return [k for k in ranking_columns(cols) if isinstance(obj, dict) and obj.get(k) is not None]


def dense_ranks(keys) -> tuple[int, ...]:
    """1 for the smallest key, 2 for the next distinct one, ...; equal keys share a rank."""
    position = {key: i for i, key in enumerate(sorted(set(keys)), start=1)}
    return tuple(position[key] for key in keys)


def row_to_ranking(obj, where: str, row: int, cols: Columns) -> Ranking:
    """One row (a dict) -> Ranking (module docstring); errors name `where` and the key."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    present = _present_lists(obj, cols)
    if not present:
        return _pair_ranking(obj, where, row, cols)
    if len(present) > 1:
        raise DataError(
            f"{where}: the row has {' and '.join(map(repr, present))}; a ranking row has one of them"
        )
    key = present[0]
    if key == cols.responses:
        texts = _response_texts(obj, key, where)
        ranks = tuple(range(1, len(texts) + 1))
    elif key == cols.answers:
        texts, ranks = _nectar_answers(obj, key, where)
    else:
        texts = _response_texts(obj, key, where)
        ranks = dense_ranks([-s for s in _scores(obj, cols.scores, len(texts), where)])
    if cols.prompt in obj:
        prompt, texts = text_field(obj, cols.prompt, where), tuple(texts)
    else:
        prompt, texts = split_shared_prefix(texts)
    return Ranking(prompt, texts, ranks, line=row, subset=subset_label(obj, cols.subset, where))


def _pair_ranking(obj: dict, where: str, row: int, cols: Columns) -> Ranking:
    """A pair row as the ranking (chosen, rejected) with ranks (1, 2)."""
    if cols.chosen_ids in obj or cols.rejected_ids in obj:
        raise DataError(
            f"{where}: a pre-tokenized pair ({cols.chosen_ids!r} / {cols.rejected_ids!r}); rankings are "
            f"read as text: give 'prompt' and {cols.responses!r} (or the pair's text columns)"
        )
    if cols.chosen not in obj or cols.rejected not in obj:
        raise DataError(
            f"{where}: neither a ranking nor a pair: needs {cols.responses!r}, {cols.answers!r} or "
            f"{cols.completions!r} (with {cols.scores!r}), or both {cols.chosen!r} and {cols.rejected!r}; "
            f"keys found: {', '.join(map(repr, obj)) or 'none'}"
        )
    pair = row_to_pair(obj, where, row, cols)
    return Ranking(pair.prompt, (pair.chosen, pair.rejected), (1, 2), line=row, subset=pair.subset)


def _response_list(obj: dict, key: str, where: str) -> list:
    """obj[key]: a list of K >= 2 items."""
    value = obj[key]
    if not isinstance(value, list):
        raise DataError(
            f"{where}: {key!r} must be a list of K >= 2 responses, got {type(value).__name__} "
            f"{str(value)[:40]}"
        )
    if len(value) < 2:
        raise DataError(f"{where}: {key!r} has {len(value)} response(s); a ranking needs at least 2")
    return value


def _response_texts(obj: dict, key: str, where: str) -> list[str]:
    """obj[key]: K >= 2 responses, each a string or chat messages (rendered)."""
    return [text_value(v, where, f"{key}[{j}]") for j, v in enumerate(_response_list(obj, key, where))]


def _nectar_answers(obj: dict, key: str, where: str) -> tuple[list[str], tuple[int, ...]]:
    """Nectar's [{"answer": text, "rank": whole number >= 1}, ...] -> (texts, dense ranks)."""
    texts, given = [], []
    for j, item in enumerate(_response_list(obj, key, where)):
        if not (isinstance(item, dict) and "answer" in item and "rank" in item):
            raise DataError(
                f"{where}: '{key}[{j}]' must be an object with 'answer' and 'rank', got {str(item)[:60]}"
            )
        texts.append(text_value(item["answer"], where, f"{key}[{j}].answer"))
        given.append(_rank(item["rank"], where, f"{key}[{j}].rank"))
    return texts, dense_ranks(given)


def _rank(value, where: str, key: str) -> int:
    """A rank: a whole number >= 1 (1.0 is 1); booleans, fractions, NaN and text are refused."""
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole or value < 1:
        raise DataError(f"{where}: {key!r} must be an integer >= 1 (1 = best), got {value!r}")
    return int(value)


def _scores(obj: dict, key: str, k: int, where: str) -> list:
    """obj[key]: k finite numbers (higher = better)."""
    if key not in obj:
        raise DataError(f"{where}: missing key {key!r}: completions need one score each (higher = better)")
    value = obj[key]
    if not isinstance(value, list) or len(value) != k:
        got = f"{len(value)} scores" if isinstance(value, list) else type(value).__name__
        raise DataError(f"{where}: {key!r} must be a list of {k} numbers (one per completion), got {got}")
    for j, s in enumerate(value):
        if (
            isinstance(s, bool)
            or not isinstance(s, (int, float))
            or (isinstance(s, float) and not math.isfinite(s))
        ):
            raise DataError(f"{where}: '{key}[{j}]' must be a finite number, got {s!r}")
    return value


def _check_ranking_columns(where: str, found, fmt: str, cols: Columns) -> None:
    """A table's columns: a ranking's list column (completions with scores), or a pair's; CSV holds
    pairs only."""
    found = list(found)
    lists = [k for k in (*ranking_columns(cols), cols.scores) if k in found]
    if fmt == "csv" and lists:
        raise DataError(
            f"{where}: column {lists[0]!r} holds lists, which CSV cells cannot; write rankings as JSON "
            f"Lines, JSON or Parquet (a CSV holds plain pairs only)"
        )
    if cols.completions in found and cols.scores not in found:
        raise DataError(
            f"{where}: column {cols.completions!r} needs a {cols.scores!r} column (one score per "
            f"completion); columns found: {', '.join(map(repr, found))}"
        )
    if not any(k in found for k in ranking_columns(cols)):
        pair_rows(cols).check_columns(where, found, fmt)


def ranking_rows(cols: Columns) -> RowKind:
    """Rows read as Rankings (row_to_ranking) with these column names."""
    return RowKind(
        item="ranking",
        cols=cols,
        check_columns=lambda where, found, fmt: _check_ranking_columns(where, found, fmt, cols),
        convert=lambda obj, where, row: row_to_ranking(obj, where, row, cols),
    )


def load_rankings(path, cols: Columns | None = None) -> list[Ranking]:
    """Rankings from a JSON Lines / JSON / Parquet file (by name), a saved Hugging Face `datasets`
    directory ("DIR", or "DIR:SPLIT"), or a CSV of plain pairs; rows as in this module's
    docstring. `cols`: other column names."""
    return load_rows(path, ranking_rows(cols or Columns()))


def ranking_pairs(rankings: list[Ranking]) -> list[PreferencePair]:
    """The ordered pairs (better, worse) of each ranking, ties skipped: C(K, 2) for a ranking
    without ties. In ranking order, then by (better index, worse index) within a ranking; each pair
    keeps its ranking's prompt, line and subset (no margin)."""
    return [
        PreferencePair(r.prompt, r.responses[b], r.responses[w], line=r.line, subset=r.subset)
        for r in rankings
        for b in range(len(r.responses))
        for w in range(len(r.responses))
        if r.ranks[b] < r.ranks[w]
    ]


def load_pairs_or_rankings(path, cols: Columns) -> tuple[list[PreferencePair] | None, list[Ranking] | None]:
    """(pairs, None) for a file of pairs, (None, rankings) for one with ranking rows; a file that is
    neither raises the pairs' error."""
    try:
        return load_pairs(path, cols), None
    except DataError as pair_error:
        try:
            return None, load_rankings(path, cols)
        except DataError:
            raise pair_error from None
