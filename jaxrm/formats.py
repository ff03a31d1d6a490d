"""Preference files in the formats users have -> PreferencePair lists (load_pairs); the pair types.

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


def pair_location(source: str, i: int, pair, with_index: bool = False) -> str:
    """Where pair i is: "FILE:LINE" (+ " (pair i)" with_index) when it knows its line, else "FILE: pair i"."""
    line = getattr(pair, "line", None)
    if not line:
        return f"{source}: pair {i}"
    return f"{source}:{line} (pair {i})" if with_index else f"{source}:{line}"


def common_prefix_len(a, b) -> int:
    """How many leading items (characters, token ids) two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


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


def split_common_prefix(a: str, b: str) -> tuple[str, str, str]:
    """(prompt, a_answer, b_answer): the longest common prefix, cut back to position 0 or to just
    after a whitespace character."""
    n = common_prefix_len(a, b)
    while n > 0 and not a[n - 1].isspace():
        n -= 1
    return a[:n], a[n:], b[n:]


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


def _text(obj, key, where) -> str:
    """obj[key] as text: a string, or chat messages rendered with CHAT_TEMPLATE."""
    value = obj.get(key)
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


def _subset(obj, key, where) -> str | None:
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
    subset = _subset(obj, cols.subset, where)
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
    chosen = _text(obj, cols.chosen, where)
    rejected = _text(obj, cols.rejected, where)
    if cols.prompt in obj:
        prompt = _text(obj, cols.prompt, where)
        return PreferencePair(prompt, chosen, rejected, margin, line=row, subset=subset)
    prompt, chosen, rejected = split_common_prefix(chosen, rejected)
    return PreferencePair(prompt, chosen, rejected, margin, line=row, subset=subset)


# ----------------------------------------------------------------------------- readers


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


def _jsonl(path: pathlib.Path, cols: Columns):
    with _Reader(path) as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            line = _decode(raw, where)
            if not line.strip():
                continue  # blank lines are allowed
            obj = _loads(line, where, one_line=True)
            yield row_to_pair(obj, where, lineno, cols)


def _json(path: pathlib.Path, cols: Columns):
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
        yield row_to_pair(obj, f"{path}: row {i}", i, cols)


def _csv(path: pathlib.Path, cols: Columns):
    with _Reader(path) as f:
        text = _decode(f.read(), str(path))
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None:
        return
    _check_columns(path, reader.fieldnames, cols)
    for i, obj in enumerate(_csv_rows(reader, path), start=1):
        if None in obj:
            raise DataError(f"{path}: row {i}: more cells than the header's {len(reader.fieldnames)} columns")
        if cols.prompt in obj and obj[cols.prompt] is None:
            obj[cols.prompt] = ""
        yield row_to_pair({k: v for k, v in obj.items() if v is not None}, f"{path}: row {i}", i, cols)


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


def _parquet(path: pathlib.Path, cols: Columns):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as e:
        raise DataError(f"{path}: cannot read Parquet ({e})") from None
    _check_columns(path, table.column_names, cols)
    for i, obj in enumerate(table.to_pylist(), start=1):
        yield row_to_pair(obj, f"{path}: row {i}", i, cols)


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


def _hf_dataset(path: pathlib.Path, split: str | None, cols: Columns):
    markers = [m for m in DATASET_MARKERS if (path / m).is_file()]
    if not markers:
        raise DataError(
            f"{path}: is a directory, not a pair file; a saved Hugging Face dataset directory holds "
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
    _check_columns(where, ds.column_names, cols)
    row = 0
    for batch in ds.iter(batch_size=1024):  # dict of columns -> rows
        for values in zip(*batch.values()):
            row += 1
            yield row_to_pair(dict(zip(batch, values)), f"{where}: row {row}", row, cols)


def load_pairs(path, cols: Columns | None = None) -> list[PreferencePair]:
    """Pairs from a JSON Lines / JSON / CSV / Parquet file (by name), or a saved Hugging Face
    `datasets` directory ("DIR", or "DIR:SPLIT" for a DatasetDict); rows as in this module's
    docstring. `cols`: other column names."""
    path, split = dataset_dir_and_split(path)
    if path.is_dir():
        name = f"{path}:{split}" if split else str(path)
        reader = lambda: _hf_dataset(path, split, cols or Columns())
    elif path.is_file():
        name = str(path)
        reader = lambda: READERS[file_format(path)](path, cols or Columns())
    else:
        raise DataError(f"{path}: no such file")
    try:
        pairs = list(reader())
    except (OSError, EOFError) as e:  # e.g. a truncated or not-really-gzip .gz file
        raise DataError(f"{name}: cannot read file ({e})") from None
    if not pairs:
        raise DataError(f"{name}: empty file, no pairs found")
    return pairs
