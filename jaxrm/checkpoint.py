"""Checkpoints of the whole train state with Orbax, and safetensors export of the weights.

A checkpoint step holds `state` (params, optimizer state, step, RNG) and `meta` (run config,
data-iterator position). Orbax writes each step to a temporary directory and renames it when
complete, so a half-written step is never listed as the latest. Leaves are stored under their
pytree paths, so a restore into a state of another structure fails naming the keys.
"""
from __future__ import annotations

import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    pass


def flatten(tree) -> dict:
    """{pytree path string: leaf}, e.g. "params['h'][0]['attn']['c_attn']['kernel']"."""
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def unflatten(target, flat: dict, where: str):
    """Fill `target`'s structure from `flat`; keys and shapes must match exactly."""
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    expected = {jax.tree_util.keystr(p): leaf for p, leaf in paths_and_leaves}
    missing, unexpected = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{where} does not match this run's model/optimizer: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, leaf in expected.items():
        if np.shape(flat[key]) != np.shape(leaf):
            raise CheckpointError(f"{where}: {key} has shape {np.shape(flat[key])}, this run needs {np.shape(leaf)}")
    return jax.tree_util.tree_unflatten(treedef, [flat[jax.tree_util.keystr(p)] for p, _ in paths_and_leaves])


class Checkpointer:
    """Keeps the last `keep` steps under `directory`."""

    def __init__(self, directory, keep: int = 3):
        self.directory = pathlib.Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, meta: dict) -> None:
        try:
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(flatten(state)),
                                                            meta=ocp.args.JsonSave(meta)), force=True)
            self.manager.wait_until_finished()
        except Exception as e:  # disk full, permissions, ...: earlier steps stay intact
            raise CheckpointError(f"could not save checkpoint step {step} in {self.directory}: {e}") from e

    def read_meta(self, step: int | None = None) -> dict:
        step = self._step(step)
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:
            raise CheckpointError(f"cannot read checkpoint step {step} in {self.directory}: {e}") from e

    def restore(self, target_state, step: int | None = None):
        """(state with target_state's structure, meta) of `step` (default: the latest)."""
        step = self._step(step)
        abstract = {k: ocp.utils.to_shape_dtype_struct(v) for k, v in flatten(target_state).items()}
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointError(f"cannot restore checkpoint step {step} in {self.directory}: {e}") from e
        return unflatten(target_state, dict(restored.state), f"checkpoint step {step} in {self.directory}"), restored.meta

    def _step(self, step):
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise CheckpointError(f"no checkpoint{'' if step is None else f' step {step}'} in {self.directory}")
        return step

    def close(self):
        self.manager.close()


def save_safetensors(state_dict: dict[str, np.ndarray], path, metadata: dict[str, str] | None = None) -> None:
    """Weights under torchref's state_dict keys; written to a temp file and renamed (atomic)."""
    from safetensors.numpy import save_file
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


def load_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(state_dict, metadata) from a safetensors file: data only, no code."""
    from safetensors import safe_open
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
