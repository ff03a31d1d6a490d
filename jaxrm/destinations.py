"""Where a command may write: never into what it reads, never over a file without --force, and in the
format the destination is (jaxrm convert; jaxrm train --init / --out)."""

from __future__ import annotations

import json
import pathlib

FORMATS = ("torchref", "hf-seq-cls")
WEIGHT_SUFFIXES = (".safetensors", ".pt")


class DestinationError(ValueError):
    """A destination jaxrm refuses to write, and why."""


def _inside(path: pathlib.Path, directory: pathlib.Path) -> bool:
    path, directory = path.resolve(), directory.resolve()
    return path == directory or directory in path.parents


def check_init_and_out(init: pathlib.Path, out: pathlib.Path) -> None:
    """A run never writes into its --init source (the same path, one inside the other)."""
    if _inside(out, init) or _inside(init, out):
        raise DestinationError(
            f"--out {out} and --init {init} overlap: a run never writes into the weights it starts "
            f"from; choose another --out"
        )


def is_hf_directory(path: pathlib.Path) -> bool:
    """A transformers model directory: its config.json has a "model_type"."""
    try:
        return "model_type" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def convert_target(
    src: pathlib.Path, dst: pathlib.Path, to: str | None, force: bool
) -> tuple[str, pathlib.Path]:
    """(format, the path to write) of `jaxrm convert SRC DST [--to FORMAT] [--force]`. The format is
    --to, else the destination's: an existing transformers directory is hf-seq-cls, anything else
    torchref (.safetensors or .pt file, or DIR/model.safetensors). Raises DestinationError for a
    destination inside the source, a format the destination contradicts, or (without --force) one
    that exists."""
    if _inside(dst, src):
        raise DestinationError(f"{dst} is inside the source run {src}: convert never writes into its source")
    hf = dst.is_dir() and is_hf_directory(dst)
    to = to or ("hf-seq-cls" if hf else "torchref")
    if to == "hf-seq-cls":
        if dst.exists() and not dst.is_dir() or not dst.exists() and dst.suffix:
            raise DestinationError(f"--to hf-seq-cls writes a directory; {dst} is (or names) a file")
        if dst.is_dir() and any(dst.iterdir()) and not force:
            raise DestinationError(f"{dst} exists and is not empty; add --force to replace its files")
        return to, dst
    if hf:
        raise DestinationError(
            f"{dst} holds a transformers model (config.json with model_type): a torchref state_dict "
            f"there would break it; use --to hf-seq-cls (with --force) to replace it, or another path"
        )
    if dst.suffix and not dst.is_dir() and dst.suffix not in WEIGHT_SUFFIXES:
        raise DestinationError(
            f"{dst}: unknown weights format {dst.suffix!r}; name a .safetensors or .pt file, or a directory"
        )
    path = dst if dst.suffix in WEIGHT_SUFFIXES and not dst.is_dir() else dst / "model.safetensors"
    if path.exists() and not force:
        raise DestinationError(f"{path} exists; add --force to replace it, or choose another path")
    return to, path
