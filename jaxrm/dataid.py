"""A run's data identity: path, size and a content hash of the encoded pairs, recorded in every
checkpoint so that a resume onto other data is refused (unless the user allows it) instead of silent."""

from __future__ import annotations

import hashlib
import pathlib

import numpy as np


def _bytes_on_disk(path: str) -> int | None:
    """The file's size, or the total of a directory's files (a saved datasets directory); None if absent."""
    p = pathlib.Path(path.rsplit(":", 1)[0] if not pathlib.Path(path).exists() else path)
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return None


def data_identity(path: str, data) -> dict:
    """{"path", "bytes", "pairs", "sha256"}: the sha256 covers the encoded arrays (EncodedPairs: ids,
    lengths and margins; EncodedRankings: ids, lengths, ranks and offsets), so it changes with the
    data, the tokenizer or the truncation, not with the file's name. "pairs": the number of pairs
    (of ranked prompts, for rankings)."""
    h = hashlib.sha256()
    for array in data.arrays():
        h.update(str(array.shape).encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return {"path": path, "bytes": _bytes_on_disk(path), "pairs": len(data), "sha256": h.hexdigest()}


def describe(identity: dict) -> str:
    size = "" if identity.get("bytes") is None else f", {identity['bytes']} bytes"
    return f"{identity['path']} ({identity['pairs']} pairs{size}, sha256 {identity['sha256'][:12]})"


def data_change(saved: dict | None, current: dict) -> str | None:
    """What changed between the checkpoint's data and this run's, or None when the content is the same."""
    if not saved or saved.get("sha256") == current["sha256"]:
        return None
    return f"the checkpoint was trained on {describe(saved)}, this run has {describe(current)}"
