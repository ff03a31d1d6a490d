"""Checkpoints of the whole train state with Orbax, and safetensors export of the weights.

A checkpoint step holds `state` (params, optimizer state, step, RNG) and `meta` (run config,
data-iterator position). Orbax writes each step to a temporary directory and renames it when
complete. Orbax does not checksum array data, so after the rename we write STEP/MANIFEST: the
size and sha256 of every file of the step. A step counts only once its manifest is there (a save
cut short is never the latest), and a restore first checks every file against it, naming the
file and step that changed. Old steps are deleted only after the new step's manifest is written.
Leaves are stored under their pytree paths, so a restore into a state of another structure fails
naming the keys.

Safetensors exports carry the sha256 of each tensor in their metadata (safetensors checks its
header but not the tensor bytes); load_safetensors verifies it when present.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

MANIFEST = "jaxrm_manifest.json"
TENSOR_SHA256 = "jaxrm.sha256"  # safetensors metadata key: {tensor name: sha256 of its bytes}


class CheckpointError(RuntimeError):
    pass


class CorruptCheckpoint(CheckpointError):
    """A file of a saved step no longer matches its manifest."""


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(step_dir: pathlib.Path) -> None:
    files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    listing = {str(p.relative_to(step_dir)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    _write_atomic(step_dir / MANIFEST, json.dumps({"files": listing}, indent=1).encode())


def check_manifest(step_dir: pathlib.Path) -> None:
    """Raise CheckpointError (no manifest: the save did not finish) or CorruptCheckpoint (a file changed)."""
    try:
        listing = json.loads((step_dir / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{step_dir}: incomplete, no {MANIFEST} (its save did not finish)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(f"{step_dir / MANIFEST}: unreadable manifest ({e})") from None
    for name, want in listing.items():
        path = step_dir / name
        if not path.is_file():
            raise CorruptCheckpoint(f"{path}: missing (listed in {MANIFEST})")
        if path.stat().st_size != want["bytes"]:
            raise CorruptCheckpoint(
                f"{path}: {path.stat().st_size} bytes, {want['bytes']} when saved (truncated?)"
            )
        if _sha256(path) != want["sha256"]:
            raise CorruptCheckpoint(f"{path}: sha256 differs from the one recorded when saved (file damaged)")


def flatten(tree) -> dict:
    """{pytree path string: leaf}, e.g. "params['h'][0]['attn']['c_attn']['kernel']"."""
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def unflatten(target, flat: dict, where: str):
    """Fill `target`'s structure from `flat`; keys and shapes must match exactly."""
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    expected = {jax.tree_util.keystr(p): leaf for p, leaf in paths_and_leaves}
    missing, unexpected = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{where} does not match this run's model/optimizer: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, leaf in expected.items():
        if np.shape(flat[key]) != np.shape(leaf):
            raise CheckpointError(
                f"{where}: {key} has shape {np.shape(flat[key])}, this run needs {np.shape(leaf)}"
            )
    return jax.tree_util.tree_unflatten(treedef, [flat[jax.tree_util.keystr(p)] for p, _ in paths_and_leaves])


class Checkpointer:
    """Keeps the last `keep` complete steps under `directory`."""

    def __init__(self, directory, keep: int = 3):
        self.directory = pathlib.Path(directory).absolute()
        self.keep = keep
        self._verified: set[int] = set()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
        )  # no max_to_keep: we delete after the manifest

    def step_dir(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def all_steps(self) -> list[int]:
        """Steps whose save finished (manifest written), oldest first; not yet verified."""
        return sorted(s for s in self.manager.all_steps() if (self.step_dir(s) / MANIFEST).is_file())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def verify(self, step: int) -> None:
        """Check every file of `step` against its manifest (once per step and process)."""
        if step not in self._verified:
            try:
                check_manifest(self.step_dir(step))
            except CheckpointError as e:
                raise type(e)(f"checkpoint step {step}: {e}") from None
            self._verified.add(step)

    def latest_intact_step(self, report=print) -> int | None:
        """The newest step that passes verify(). Newer steps that are incomplete (a save cut short)
        or corrupt are renamed STEP.incomplete / STEP.corrupt (never deleted) and reported.
        If corrupt steps were found and no intact one is left, raise instead of starting over."""
        found, corrupt = None, []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                self.verify(step)
                found = step
                break
            except CheckpointError as e:
                kind = "corrupt" if isinstance(e, CorruptCheckpoint) else "incomplete"
                corrupt += [step] if kind == "corrupt" else []
                report(f"{e}; moved it to {self._move_aside(step, kind)}; using an earlier checkpoint")
        if jax.process_count() > 1:  # every process sees the renames before listing the steps again
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jaxrm: checkpoints verified")
        self.manager.reload()
        if found is None and corrupt:
            raise CheckpointError(
                f"no intact checkpoint left in {self.directory}: step(s) {corrupt} are corrupt "
                f"(moved to STEP.corrupt). Run the same command again to start over from step 0."
            )
        return found

    def _move_aside(self, step: int, kind: str) -> pathlib.Path:
        target, n = self.directory / f"{step}.{kind}", 1
        while target.exists():
            target, n = self.directory / f"{step}.{kind}-{n}", n + 1
        if jax.process_index() == 0:
            self.step_dir(step).rename(target)
        return target

    def save(self, step: int, state, meta: dict) -> None:
        """Save `step`, write its manifest, then delete complete steps beyond the newest `keep`."""
        threads = set(threading.enumerate())
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(flatten(state)), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )
            self.manager.wait_until_finished()
            if jax.process_index() == 0:
                write_manifest(self.step_dir(step))
        except Exception as e:  # disk full, permissions, ...: earlier steps stay intact
            previous = self.latest_step()
            self._clean_failed_save(step, threads)
            raise CheckpointError(
                f"could not save checkpoint step {step} in {self.directory}: {e}. "
                + (
                    f"Checkpoint step {previous} is intact: fix the cause and run the same "
                    f"command again to resume from it."
                    if previous is not None
                    else "No earlier checkpoint."
                )
            ) from e
        self._verified.add(step)
        for old in sorted(self.manager.all_steps())[: -self.keep]:
            self.manager.delete(old)

    def _clean_failed_save(self, step: int, threads_before: set) -> None:
        """Remove what a failed save left (frees the space it took): its temporary and manifest-less
        directories, once the writer threads the save started have stopped."""
        deadline = time.time() + 60
        while (
            writers := [t for t in set(threading.enumerate()) - threads_before if t.is_alive()]
        ) and time.time() < deadline:
            for thread in writers:
                try:
                    thread.join(timeout=max(deadline - time.time(), 0))
                except Exception:  # Orbax's threads re-raise their own write error on join
                    pass
        if jax.process_index() == 0:
            for path in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(path, ignore_errors=True)
            if self.step_dir(step).is_dir() and not (self.step_dir(step) / MANIFEST).is_file():
                shutil.rmtree(self.step_dir(step), ignore_errors=True)
        try:
            self.manager.reload()
        except Exception:
            pass

    def read_meta(self, step: int | None = None) -> dict:
        step = self._step(step)
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:
            raise CheckpointError(f"cannot read checkpoint step {step} in {self.directory}: {e}") from e

    def restore(self, target_state, step: int | None = None):
        """(state with target_state's structure, meta) of `step` (default: the latest), verified first."""
        step = self._step(step)
        abstract = {k: ocp.utils.to_shape_dtype_struct(v) for k, v in flatten(target_state).items()}
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:
            raise CheckpointError(f"cannot restore checkpoint step {step} in {self.directory}: {e}") from e
        return unflatten(
            target_state, dict(restored.state), f"checkpoint step {step} in {self.directory}"
        ), restored.meta

    def _step(self, step):
        step = self.latest_step() if step is None else step
        if step is None or step not in self.manager.all_steps():
            raise CheckpointError(
                f"no checkpoint{'' if step is None else f' step {step}'} in {self.directory}"
            )
        self.verify(step)
        return step

    def close(self):
        self.manager.close()


def file_mode() -> int:
    """The mode open() gives a new file under this process's umask (0o644 under umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_safetensors(state_dict: dict[str, np.ndarray], path, metadata: dict[str, str] | None = None) -> None:
    """Weights under torchref's state_dict keys; written to a temp file and renamed (atomic)."""
    from safetensors.numpy import save_file

    path = pathlib.Path(path)
    tensors = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
    digests = json.dumps({k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in tensors.items()})
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={**(metadata or {}), TENSOR_SHA256: digests})
    os.chmod(tmp, file_mode())  # safetensors creates its files 0600; ours follow the umask like any other
    tmp.replace(path)


def save_torch(state_dict: dict[str, np.ndarray], path) -> None:
    """A torch state_dict file (.pt: tensors only, so torch.load(weights_only=True) reads it); atomic."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path}: writing a .pt file needs torch (pip install torch); or use .safetensors"
        ) from None
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}, str(tmp))
    os.chmod(tmp, file_mode())
    tmp.replace(path)


def load_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(state_dict, metadata) from a safetensors file: data only, no code. Tensors are checked
    against the sha256s in the metadata when the file has them (files written by save_safetensors)."""
    from safetensors import safe_open

    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            state_dict, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    if TENSOR_SHA256 in metadata:
        try:
            digests = json.loads(metadata[TENSOR_SHA256])
        except ValueError:
            raise CheckpointError(f"{path}: unreadable {TENSOR_SHA256} metadata (file damaged)") from None
        if set(digests) != set(state_dict):
            raise CheckpointError(
                f"{path}: tensor names differ from those recorded when saved (file damaged)"
            )
        for k, v in state_dict.items():
            if hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() != digests[k]:
                raise CheckpointError(
                    f"{path}: tensor {k!r} differs from the sha256 recorded when saved (file damaged)"
                )
    return state_dict, metadata
