"""A run directory: config.json, metrics.jsonl, checkpoints/, model.safetensors, curves.png."""

from __future__ import annotations

import json
import pathlib

from jaxrm import convert
from jaxrm.checkpoint import Checkpointer, CheckpointError, load_safetensors, save_safetensors
from jaxrm.config import RunConfig
from jaxrm.model import RewardModel
from jaxrm.state import abstract_train_state, merge_model

CONFIG, METRICS, CHECKPOINTS, WEIGHTS, CURVES, SUMMARY = (
    "config.json",
    "metrics.jsonl",
    "checkpoints",
    "model.safetensors",
    "curves.png",
    "summary.json",
)


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
    """Write the weights under torchref's state_dict keys to `path` (default RUN_DIR/model.safetensors)."""
    path = pathlib.Path(path) if path is not None else pathlib.Path(run_dir) / WEIGHTS
    save_safetensors(
        convert.to_torch_state_dict(model),
        path,
        metadata={"format": "torchref", "model_config": json.dumps(model.config.__dict__)},
    )
    return path


def load_model(run_dir) -> tuple[RunConfig, RewardModel]:
    """The trained model of a run: model.safetensors, else the latest checkpoint's params."""
    run_dir = pathlib.Path(run_dir)
    run = read_config(run_dir)
    weights = run_dir / WEIGHTS
    if weights.is_file():
        state_dict, _ = load_safetensors(weights)
        return run, convert.from_torch_state_dict(run.model, state_dict)
    ckpt = Checkpointer(run_dir / CHECKPOINTS)  # a checkpoint without exported weights
    if ckpt.latest_step() is None:
        raise CheckpointError(f"{run_dir}: no {WEIGHTS} and no checkpoint to load")
    state, _ = ckpt.restore(abstract_train_state(run.model, run.train))
    return run, merge_model(run.model, state.params)
