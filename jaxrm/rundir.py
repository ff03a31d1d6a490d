"""A run directory: config.json, metrics.jsonl, checkpoints/, model.safetensors, curves.png."""

from __future__ import annotations

import json
import pathlib
import shutil

from jaxrm import convert
from jaxrm.checkpoint import (
    MANIFEST,
    Checkpointer,
    CheckpointError,
    load_safetensors,
    save_safetensors,
    save_torch,
)
from jaxrm.config import RunConfig
from jaxrm.model import RewardModel
from jaxrm.runlock import LOCK
from jaxrm.state import abstract_train_state, merge_model

CONFIG, METRICS, CHECKPOINTS, WEIGHTS, CURVES, SUMMARY = (
    "config.json",
    "metrics.jsonl",
    "checkpoints",
    "model.safetensors",
    "curves.png",
    "summary.json",
)


class NotARunDirectory(ValueError):
    """--out names something jaxrm did not write: a file, or a directory of other files."""


def is_run_config(path: pathlib.Path) -> bool:
    """Whether `path` is a config.json written by jaxrm (a "model" and a "train" section, nothing else)."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and set(config) == {"model", "train"}


def check_out_dir(out: pathlib.Path) -> bool:
    """Refuse an --out that jaxrm must not write into: a file, or a non-empty directory that is not a
    jaxrm run (its config.json is not jaxrm's). True when `out` does not exist yet."""
    if out.exists() and not out.is_dir():
        raise NotARunDirectory(f"--out {out} is a file, not a directory; choose a directory for the run")
    if not out.exists():
        return True
    entries = sorted(p.name for p in out.iterdir())
    if not entries or (out / CONFIG).is_file() and is_run_config(out / CONFIG):
        return False
    if set(entries) <= {CHECKPOINTS, LOCK}:  # a run that stopped before it wrote its config
        return False
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    raise NotARunDirectory(
        f"{out} is not empty and is not a jaxrm run (it holds {shown}, and no config.json written by "
        f"jaxrm); jaxrm writes only into a new or empty directory or one of its own runs: choose "
        f"another --out"
    )


def remove_if_unused(out: pathlib.Path) -> None:
    """After a run that failed before writing anything: remove the directory it created (the lock
    file and an empty checkpoints/ at most)."""
    if not out.is_dir():
        return
    entries = {p.name for p in out.iterdir()}
    checkpoints = out / CHECKPOINTS
    if entries <= {CHECKPOINTS, LOCK} and (not checkpoints.is_dir() or not any(checkpoints.iterdir())):
        shutil.rmtree(out, ignore_errors=True)


def write_config(run_dir, run: RunConfig) -> None:
    path = pathlib.Path(run_dir) / CONFIG
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(run.to_dict(), indent=2) + "\n")
    tmp.replace(path)


def read_config(run_dir) -> RunConfig:
    path = pathlib.Path(run_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; is {run_dir} a directory written by `jaxrm train`?")
    try:
        return RunConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a valid jaxrm config ({e})") from None


def export_weights(run_dir, model: RewardModel, path=None) -> pathlib.Path:
    """Write the weights under torchref's state_dict keys to `path` (default RUN_DIR/model.safetensors);
    a `.pt` path gets a torch state_dict (tensors only: torch.load(weights_only=True) reads it)."""
    path = pathlib.Path(path) if path is not None else pathlib.Path(run_dir) / WEIGHTS
    if path.suffix == ".pt":
        save_torch(convert.to_torch_state_dict(model), path)
        return path
    save_safetensors(
        convert.to_torch_state_dict(model),
        path,
        metadata={"format": "torchref", "model_config": json.dumps(model.config.__dict__)},
    )
    return path


def _checkpoint_steps(run_dir: pathlib.Path) -> list[int]:
    """Steps of the run's complete checkpoints (those with a manifest), oldest first."""
    directory = run_dir / CHECKPOINTS
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / MANIFEST).is_file())


def _exported_step(run_dir: pathlib.Path) -> int | None:
    try:
        return int(json.loads((run_dir / SUMMARY).read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_model(run_dir, say=None) -> tuple[RunConfig, RewardModel]:
    """The trained model of a run: model.safetensors, else the latest checkpoint's params.
    `say`, when given, is told what was loaded, from where, at which step."""
    run_dir = pathlib.Path(run_dir)
    run = read_config(run_dir)
    weights, steps = run_dir / WEIGHTS, _checkpoint_steps(run_dir)
    say = say or (lambda text: None)
    if weights.is_file():
        state_dict, _ = load_safetensors(weights)
        exported = _exported_step(run_dir)
        newer = [s for s in steps if exported is not None and s > exported]
        say(
            f"loaded {weights} (step {exported if exported is not None else 'unknown'} of "
            f"max_steps {run.train.max_steps})"
            + (f"; the run has a newer checkpoint, step {newer[-1]}, not exported yet" if newer else "")
        )
        return run, convert.from_torch_state_dict(run.model, state_dict)
    ckpt = Checkpointer(run_dir / CHECKPOINTS)  # a checkpoint without exported weights
    if ckpt.latest_step() is None:
        raise CheckpointError(f"{run_dir}: no {WEIGHTS} and no checkpoint to load")
    state, _ = ckpt.restore(abstract_train_state(run.model, run.train))
    say(
        f"loaded checkpoint step {ckpt.latest_step()} of max_steps {run.train.max_steps} from "
        f"{run_dir / CHECKPOINTS} (the run has no exported {WEIGHTS}: unfinished)"
    )
    return run, merge_model(run.model, state.params)
