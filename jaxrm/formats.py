"""Preference files in the formats users have -> PreferencePair lists (load_pairs); the pair types;
the file readers (load_rows) that rankings (jaxrm/ranking_formats.py) share.

Files, by name:
    *.jsonl, *.jsonl.gz (and any other name: JSON Lines)   one JSON object per line
    *.json, *.json.gz                                     one JSON list of objects
    *.csv, *.csv.gz                                       a header row, then one pair per row
    *.parquet                                             needs pyarrow
    DIR, DIR:SPLIT                                        a Hugging Face `datasets` directory written by
        Dataset.save_to_disk (DIR holds dataset_info.json / state.json) or DatasetDict.save_to_disk
        (DIR holds dataset_dict.json; the split is DIR:SPLIT, or the only one; DIR/SPLIT also works);
        needs the `datasets` package, imported only then; rows go through the same handling below
Rows (column names configurable, see Columns / TrainConfig.*_key):
    explicit prompt     {"prompt": "Q: ...", "chosen": " good", "rejected": " bad"}
    implicit prompt     {"chosen": "<dialogue> good", "rejected": "<dialogue> bad"}   (no prompt column)
        the prompt is the longest common prefix of the two texts, cut back so that it ends at
        position 0 or right after a whitespace character (both answers then start at a word);
    chat messages       chosen / rejected (and optionally prompt) are lists of
        {"role": ..., "content": ...}; rendered with CHAT_TEMPLATE: each message becomes
        "\\n\\n{Role}: {content}", Role = Human for "user", Assistant for "assistant", System
        for "system", else the role capitalized (Anthropic HH's layout). Without a prompt column
        the rendered texts are split as implicit prompts;
    pre-tokenized       {"input_ids_chosen": [ids], "input_ids_rejected": [ids]} (text columns optional);
    margin              an optional number per pair ("margin"); empty / null = none.
    subset              an optional label per pair ("subset", e.g. RewardBench's subset names); `jaxrm
        eval` reports accuracy per label; empty / null = none. A number is read as its text.
    rankings            a prompt with K >= 2 ranked responses, read by load_rankings
        (jaxrm/ranking_formats.py; K varies from row to row): {"prompt", "responses": [best, ...,
        worst]}, Nectar's {"prompt", "answers": [{"answer", "rank"}, ...]} (rank 1 = best), or
        {"prompt", "completions": [...], "scores": [...]} (higher = better); equal ranks or scores
        are ties (no preference either way, never ordered at random); responses and prompt may be
        chat messages, the prompt may be implicit (the prefix all K texts share); a pair row is
        the K = 2 case. Not in CSV (its cells cannot hold lists): JSON Lines, JSON, Parquet, datasets.
A sequence is tokenizer.encode(prompt + answer) (or the given ids): the prompt split changes no
token; it is what lint reports and what prompt truncation may cut.
Locations in errors: "FILE:LINE" for JSON Lines, "FILE: row N" (1-based, header excluded) otherwise.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import pathlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, fields

FLOAT32_MAX = 3.4028234663852886e38
ROLE_NAMES = {"user": "Human", "human": "Human", "assistant": "Assistant", "system": "System"}
CHAT_TEMPLATE = "\n\n{role}: {content}"


class DataError(ValueError):
    """Bad preference data; the message names the file / line or pair and what is wrong."""


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None
    line: int | None = field(default=None, compare=False, repr=False)  # 1-based line (JSONL) or row
    chosen_ids: tuple | None = None  # pre-tokenized sequences: used instead of encode(prompt + answer)
    rejected_ids: tuple | None = None
    subset: str | None = field(default=None, compare=False)  # the "subset" column: a label for eval's tables


def pair_location(source: str, i: int, pair, with_index: bool = False, item: str = "pair") -> str:
    """Where pair i is: "FILE:LINE" (+ " (pair i)" with_index) when it knows its line, else "FILE: pair i".
    `item` names what it is in place of "pair" (e.g. "ranking")."""
    line = getattr(pair, "line", None)
    if not line:
        return f"{source}: {item} {i}"
    return f"{source}:{line} ({item} {i})" if with_index else f"{source}:{line}"


def common_prefix_len(a, b) -> int:
    """How many leading items (characters, token ids) two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def shared_prefix_len(seqs) -> int:
    """How many leading items (characters, token ids) all of K >= 1 sequences share."""
    return min(common_prefix_len(seqs[0], s) for s in seqs)


def is_float32(value) -> bool:
    """A finite number within float32 range (batches hold margins as float32); False for NaN / inf."""
    return abs(value) <= FLOAT32_MAX


@dataclass(frozen=True)
class Columns:
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    margin: str = "margin"
    subset: str = "subset"
    chosen_ids: str = "input_ids_chosen"
    rejected_ids: str = "input_ids_rejected"
    # rankings (jaxrm/ranking_formats.py): the list columns of a ranking row
    responses: str = "responses"
    answers: str = "answers"
    completions: str = "completions"
    scores: str = "scores"

    @classmethod
    def from_train_config(cls, tc) -> Columns:
        return cls(
            **{f.name: getattr(tc, f"{f.name}_key") for f in fields(cls) if hasattr(tc, f"{f.name}_key")}
        )


def file_format(path) -> str:
    name = pathlib.Path(path).name.lower()
    name = name[:-3] if name.endswith(".gz") else name
    for fmt in ("jsonl", "json", "csv", "parquet"):
        if name.endswith("." + fmt):
            return fmt
    return "jsonl"


def render_chat(messages, where: str, key: str) -> str:
    parts = []
    for j, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(
                f"{where}: {key!r} message {j} must be an object with string 'role' and "
                f"'content', got {json.dumps(m)[:80]}"
            )
        parts.append(
            CHAT_TEMPLATE.format(role=ROLE_NAMES.get(m["role"], m["role"].capitalize()), content=m["content"])
        )
    return "".join(parts)


def split_shared_prefix(texts) -> tuple[str, tuple[str, ...]]:
    """(prompt, answers) of K >= 1 texts: the longest prefix they all share, cut back to position 0
    or to just after a whitespace character, and each text's rest (in the given order)."""
    first, n = texts[0], shared_prefix_len(texts)
    while n > 0 and not first[n - 1].isspace():
        n -= 1
    return first[:n], tuple(t[n:] for t in texts)


def split_common_prefix(a: str, b: str) -> tuple[str, str, str]:
    """(prompt, a_answer, b_answer): split_shared_prefix of two texts."""
    prompt, (a_answer, b_answer) = split_shared_prefix((a, b))
    return prompt, a_answer, b_answer


def _loads(text: str, where: str, *, one_line: bool = False):
    """json.loads; every way it can fail (also over-long integers and too deep nesting) is a DataError."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"column {e.colno}" if one_line else f"line {e.lineno}, column {e.colno}"
        raise DataError(f"{where}: malformed JSON ({e.msg} at {at})") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise DataError(f"{where}: malformed JSON ({e})") from None
    except RecursionError:
        raise DataError(f"{where}: malformed JSON (nested too deeply)") from None


def _unicode(value: str, where: str, key: str) -> str:
    """A JSON escape can hold a lone surrogate (\\ud800): not text any tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            f"{where}: {key!r} is not valid Unicode ({e.reason}: {value[e.start]!r} at character {e.start})"
        ) from None
    return value


def text_field(obj, key, where) -> str:
    """obj[key] as text: a string, or chat messages rendered with CHAT_TEMPLATE."""
    return text_value(obj.get(key), where, key)


def text_value(value, where: str, key: str) -> str:
    """A string, or chat messages rendered with CHAT_TEMPLATE; errors name `where` and `key`."""
    if isinstance(value, list):
        return _unicode(render_chat(value, where, key), where, key)
    if isinstance(value, str):
        return _unicode(value, where, key)
    raise DataError(
        f"{where}: {key!r} must be a string or a list of chat messages, got {type(value).__name__}"
    )


def _ids(obj, key, where):
    value = obj[key]
    if isinstance(value, str):  # CSV cells hold JSON arrays as text
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):  # malformed JSON, an over-long integer, too deep nesting
            raise DataError(
                f"{where}: {key!r} must be a list of token ids, got the text {value[:40]!r}"
            ) from None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not (
        isinstance(value, list)
        and value
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    ):
        raise DataError(
            f"{where}: {key!r} must be a non-empty list of non-negative integer token ids, "
            f"got {str(value)[:60]}"
        )
    return tuple(value)


def _margin(obj, key, where):
    value = obj.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, str):  # CSV
        try:
            value = float(value)
        except ValueError:
            raise DataError(f"{where}: {key!r} must be a finite number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: {key!r} must be a finite number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond float range
        value = math.inf
    if not is_float32(value):
        raise DataError(
            f"{where}: {key!r} must be a finite number within float32 range "
            f"(|margin| <= {FLOAT32_MAX:.4g}), got {str(value)[:40]}"
        )
    return value


def subset_label(obj, key, where) -> str | None:
    """The pair's subset label: a string (a whole number is read as its text); None when absent or empty."""
    value = obj.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(
            f"{where}: {key!r} must be a string label, got {type(value).__name__} {str(value)[:40]}"
        )
    return str(value)


def _pre_tokenized(keys, cols: Columns) -> bool:
    """Rows with either ids column are read as pre-tokenized (their text columns are optional)."""
    return cols.chosen_ids in keys or cols.rejected_ids in keys


def _missing(keys, cols: Columns) -> list[str]:
    """The required columns (both ids, or both answers) that `keys` lacks."""
    need = (
        (cols.chosen_ids, cols.rejected_ids) if _pre_tokenized(keys, cols) else (cols.chosen, cols.rejected)
    )
    return [k for k in need if k not in keys]


def row_to_pair(obj, where: str, row: int, cols: Columns = Columns()) -> PreferencePair:
    """One row (a dict) -> PreferencePair; errors name `where` and the key."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    margin = _margin(obj, cols.margin, where)
    missing = _missing(obj, cols)
    if missing:
        raise DataError(
            f"{where}: missing key(s) {', '.join(map(repr, missing))}; keys found: "
            f"{', '.join(map(repr, obj)) or 'none'}"
        )
    subset = subset_label(obj, cols.subset, where)
    if _pre_tokenized(obj, cols):
        return PreferencePair(
            "",
            "",
            "",
            margin,
            line=row,
            chosen_ids=_ids(obj, cols.chosen_ids, where),
            rejected_ids=_ids(obj, cols.rejected_ids, where),
            subset=subset,
        )
    chosen = text_field(obj, cols.chosen, where)
    rejected = text_field(obj, cols.rejected, where)
    if cols.prompt in obj:
        prompt = text_field(obj, cols.prompt, where)
        return PreferencePair(prompt, chosen, rejected, margin, line=row, subset=subset)
    prompt, chosen, rejected = split_common_prefix(chosen, rejected)
    return PreferencePair(prompt, chosen, rejected, margin, line=row, subset=subset)


# ----------------------------------------------------------------------------- readers


@dataclass(frozen=True)
class RowKind:
    """What a file's rows become: pairs (load_pairs) or rankings (jaxrm/ranking_formats.py)."""

    item: str  # the noun for messages: "pair" / "ranking"
    cols: Columns
    check_columns: Callable[[str, list, str], None]  # (where, columns found, "csv" / "parquet" / "dataset")
    convert: Callable[[object, str, int], object]  # (row, where, 1-based line or row) -> item


class _Reader:
    """A file's bytes (gunzipped for .gz), by line or whole; a read that fails (a truncated or
    bit-flipped .gz: zlib error, CRC mismatch, early end) is a DataError naming the line it broke at."""

    def __init__(self, path: pathlib.Path):
        self.path, self.lines = path, 0
        self.file = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def __iter__(self):
        while line := self._read(self.file.readline, f"{self.path}:{self.lines + 1}"):
            self.lines += 1
            yield line

    def read(self) -> bytes:
        return self._read(self.file.read, str(self.path))

    def _read(self, read, where: str) -> bytes:
        try:
            return read()
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{where}: cannot read, the file is corrupt or truncated ({e})") from None


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _check_columns(path, found, cols: Columns):
    found = list(found)
    missing = _missing(found, cols)
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(map(repr, missing))}; columns found: "
            f"{', '.join(map(repr, found)) or 'none'}"
        )


def pair_rows(cols: Columns) -> RowKind:
    """Rows read as PreferencePairs (row_to_pair) with these column names."""
    return RowKind(
        item="pair",
        cols=cols,
        check_columns=lambda where, found, fmt: _check_columns(where, found, cols),
        convert=lambda obj, where, row: row_to_pair(obj, where, row, cols),
    )


def _jsonl(path: pathlib.Path, kind: RowKind):
    with _Reader(path) as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            line = _decode(raw, where)
            if not line.strip():
                continue  # blank lines are allowed
            obj = _loads(line, where, one_line=True)
            yield kind.convert(obj, where, lineno)


def _json(path: pathlib.Path, kind: RowKind):
    with _Reader(path) as f:
        text = _decode(f.read(), str(path))
    data = _loads(text, str(path))
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"train": [...]} / {"data": [...]}
    if not isinstance(data, list):
        raise DataError(
            f"{path}: expected a JSON list of objects (or JSON Lines: name the file .jsonl), "
            f"got {type(data).__name__}"
        )
    for i, obj in enumerate(data, start=1):
        yield kind.convert(obj, f"{path}: row {i}", i)


def _csv(path: pathlib.Path, kind: RowKind):
    with _Reader(path) as f:
        text = _decode(f.read(), str(path))
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None:
        return
    kind.check_columns(str(path), reader.fieldnames, "csv")
    for i, obj in enumerate(_csv_rows(reader, path), start=1):
        if None in obj:
            raise DataError(f"{path}: row {i}: more cells than the header's {len(reader.fieldnames)} columns")
        if kind.cols.prompt in obj and obj[kind.cols.prompt] is None:
            obj[kind.cols.prompt] = ""
        yield kind.convert({k: v for k, v in obj.items() if v is not None}, f"{path}: row {i}", i)


def _csv_rows(reader, path):
    """The reader's rows; csv.Error (e.g. a cell over csv.field_size_limit()) as a DataError naming
    the line."""
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(
                f"{path}: line {reader.line_num}: unreadable CSV ({e}; JSON Lines has no cell size limit)"
            ) from None


def _parquet(path: pathlib.Path, kind: RowKind):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as e:
        raise DataError(f"{path}: cannot read Parquet ({e})") from None
    kind.check_columns(str(path), table.column_names, "parquet")
    for i, obj in enumerate(table.to_pylist(), start=1):
        yield kind.convert(obj, f"{path}: row {i}", i)


READERS = {"jsonl": _jsonl, "json": _json, "csv": _csv, "parquet": _parquet}

# files that save_to_disk writes: Dataset (dataset_info.json, state.json) / DatasetDict (dataset_dict.json)
DATASET_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")


def dataset_dir_and_split(path) -> tuple[pathlib.Path, str | None]:
    """ "DIR:SPLIT" -> (DIR, SPLIT) when DIR is a directory and the whole string names nothing;
    anything else -> (path, None)."""
    spec = str(path)
    base, sep, split = spec.rpartition(":")
    if sep and base and split and not pathlib.Path(spec).exists() and pathlib.Path(base).is_dir():
        return pathlib.Path(base), split
    return pathlib.Path(spec), None


def _hf_dataset(path: pathlib.Path, split: str | None, kind: RowKind):
    markers = [m for m in DATASET_MARKERS if (path / m).is_file()]
    if not markers:
        raise DataError(
            f"{path}: is a directory, not a {kind.item} file; a saved Hugging Face dataset directory holds "
            f"dataset_info.json / state.json (Dataset.save_to_disk) or dataset_dict.json "
            f"(DatasetDict.save_to_disk)"
        )
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{path}: a saved Hugging Face dataset ({markers[0]}); reading it needs the datasets "
            f"package (pip install datasets)"
        ) from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: cannot load the saved dataset ({type(e).__name__}: {e})") from None
    where = str(path)
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split is None or split not in ds:
            what = "choose one" if split is None else f"no split {split!r}; choose one"
            raise DataError(
                f"{path}: a DatasetDict with splits {', '.join(map(repr, splits))}: {what} as {path}:SPLIT"
            )
        ds, where = ds[split], f"{path}:{split}"
    elif split is not None:
        raise DataError(
            f"{path}: a single Dataset (no splits), but split {split!r} was asked for; "
            f"use {path} without ':{split}'"
        )
    kind.check_columns(where, ds.column_names, "dataset")
    row = 0
    for batch in ds.iter(batch_size=1024):  # dict of columns -> rows
        for values in zip(*batch.values()):
            row += 1
            yield kind.convert(dict(zip(batch, values)), f"{where}: row {row}", row)


def load_rows(path, kind: RowKind) -> list:
    """Every row of a JSON Lines / JSON / CSV / Parquet file (by name), or of a saved Hugging Face
    `datasets` directory ("DIR", or "DIR:SPLIT" for a DatasetDict), converted by `kind`; a
    DataError when there is none."""
    path, split = dataset_dir_and_split(path)
    if path.is_dir():
        name = f"{path}:{split}" if split else str(path)
        reader = lambda: _hf_dataset(path, split, kind)
    elif path.is_file():
        name = str(path)
        reader = lambda: READERS[file_format(path)](path, kind)
    else:
        raise DataError(f"{path}: no such file")
    try:
        items = list(reader())
    except (OSError, EOFError) as e:  # e.g. a truncated or not-really-gzip .gz file
        raise DataError(f"{name}: cannot read file ({e})") from None
    if not items:
        raise DataError(f"{name}: empty file, no {kind.item}s found")
    return items


def load_pairs(path, cols: Columns | None = None) -> list[PreferencePair]:
    """Pairs from a JSON Lines / JSON / CSV / Parquet file (by name), or a saved Hugging Face
    `datasets` directory ("DIR", or "DIR:SPLIT" for a DatasetDict); rows as in this module's
    docstring. `cols`: other column names."""
    return load_rows(path, pair_rows(cols or Columns()))
