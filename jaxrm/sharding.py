"""Sharded training with JAX's own engine: a device mesh, NamedShardings, jax.distributed.

The mesh has two axes (room is left for a third, `tensor`):
- `data` replicates parameters and optimizer state and splits the batch;
- `fsdp` shards every parameter (and its Adam moments) along its largest dimension that
  divides by the fsdp size (replicated when none does) and also splits the batch.

The batch is split over both axes by pairs: the (2B, T) chosen-then-rejected ids are placed
as a (2, B, T) array sharded on B, so the chosen row and the rejected row of a pair sit on
the same device; one device gets the same (2, B, T) layout (see jaxrm/step.py). A 1x1 mesh
means "no sharding": no mesh, no shardings.
"""

from __future__ import annotations

import math
import socket
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrm.config import COORDINATOR_TIMEOUT_S

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch (pair) dimension is split over both axes


class ShardingError(ValueError):
    pass


def make_mesh(data: int = 1, fsdp: int = 1, devices=None) -> Mesh | None:
    """A (data, fsdp) mesh over the first data*fsdp devices, or None for 1x1 (no sharding).

    With several processes the mesh must span every device of every process.
    """
    for name, size in (("mesh_data", data), ("mesh_fsdp", fsdp)):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ShardingError(f"{name} must be a positive int, got {size!r}")
    if data * fsdp == 1 and jax.process_count() == 1 and devices is None:
        return None
    devices = list(jax.devices() if devices is None else devices)
    n = data * fsdp
    if n > len(devices):
        raise ShardingError(
            f"mesh data={data} x fsdp={fsdp} needs {n} devices but only {len(devices)} are present "
            f"({devices[0].platform}); lower mesh_data / mesh_fsdp"
            + (
                " or set XLA_FLAGS=--xla_force_host_platform_device_count=N before starting "
                "(CPU only, for testing)"
                if devices[0].platform == "cpu"
                else ""
            )
        )
    if jax.process_count() > 1 and n != len(devices):
        raise ShardingError(
            f"with {jax.process_count()} processes the mesh must use all {len(devices)} devices; "
            f"got data={data} x fsdp={fsdp} = {n}"
        )
    # Auto axes: jit / XLA propagate shardings from the inputs' (not jax's "explicit sharding" mode)
    return jax.make_mesh(
        (data, fsdp), AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=devices[:n]
    )


def batch_size_per_shard(mesh: Mesh | None, batch_size: int, grad_accum_steps: int = 1) -> int:
    """Pairs per device per micro-batch; a clear error when the batch does not split evenly."""
    if mesh is None:
        return batch_size // grad_accum_steps
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    micro = batch_size // grad_accum_steps
    if batch_size % grad_accum_steps or micro % shards:
        raise ShardingError(
            f"batch_size={batch_size} (pairs) / grad_accum_steps={grad_accum_steps} = {micro} pairs "
            f"per micro-batch does not divide by the data-parallel size data x fsdp = {shards}; "
            f"use a batch_size that is a multiple of {shards * grad_accum_steps}"
        )
    return micro // shards


def param_spec(shape, fsdp: int) -> P:
    """Shard the largest dimension that divides by `fsdp` over the fsdp axis; else replicate."""
    if fsdp == 1 or not shape:
        return P()
    candidates = [(size, -i) for i, size in enumerate(shape) if size % fsdp == 0 and size >= fsdp]
    if not candidates:
        return P()
    dim = -max(candidates)[1]  # the largest; the first of equal ones
    return P(*[("fsdp" if i == dim else None) for i in range(len(shape))])


def state_shardings(state, mesh: Mesh):
    """NamedShardings for every leaf of a TrainState (or any pytree of arrays / ShapeDtypeStructs).

    The rule depends only on a leaf's shape, so Adam's moments are sharded like their params;
    scalars (step, counts) and the RNG key are replicated.
    """
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(np.shape(x), fsdp)), state)


def shard_state(state, mesh: Mesh | None):
    """Place a (host or single-device) state onto the mesh."""
    if mesh is None:
        return state
    return jax.device_put(state, state_shardings(state, mesh))


def abstract_with_shardings(abstract_state, mesh: Mesh | None):
    """ShapeDtypeStructs carrying the mesh's shardings: a restore target for another mesh shape."""
    if mesh is None:
        return abstract_state
    shardings = state_shardings(abstract_state, mesh)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings
    )


def batch_shardings(mesh: Mesh, lengths: bool = False) -> dict:
    """input_ids as (2, B, T) sharded on B (pairs whole on one device); margins (B,) on B;
    with `lengths` (TrainConfig.lengths="explicit") also lengths as (2, B) sharded on B."""
    shardings = {
        "input_ids": NamedSharding(mesh, P(None, BATCH_AXES)),
        "margins": NamedSharding(mesh, P(BATCH_AXES)),
    }
    if lengths:
        shardings["lengths"] = NamedSharding(mesh, P(None, BATCH_AXES))
    return shardings


def process_rows(mesh: Mesh | None, batch_size: int) -> tuple[int, int]:
    """The [start, stop) pairs of each global batch whose rows live on this process's devices.

    Each process loads only these pairs; they must be one contiguous range (they are for
    meshes built by make_mesh, whose devices are ordered process by process).
    """
    if mesh is None or jax.process_count() == 1:
        return 0, batch_size
    sharding = NamedSharding(mesh, P(BATCH_AXES))
    rows = set()
    for index in sharding.addressable_devices_indices_map((batch_size,)).values():
        rows.update(range(*index[0].indices(batch_size)))
    start, stop = min(rows), max(rows) + 1
    if len(rows) != stop - start:
        raise ShardingError(
            f"process {jax.process_index()} holds non-contiguous batch rows; build the mesh "
            f"with jaxrm.sharding.make_mesh"
        )
    return start, stop


def shard_batch(batch: dict, mesh: Mesh | None, batch_size: int, lengths: bool = False) -> dict:
    """A data-layer batch -> the train and eval steps' layout (jaxrm/step.py), on the mesh.

    `batch` holds this process's pairs only (all of them with one process):
    input_ids (2b, T) chosen then rejected, margins (b,), and with `lengths` (explicit
    sequence ends) lengths (2b,). Returns input_ids (2, B, T), margins (B,) and lengths (2, B)
    with B = batch_size, the global batch: global jax.Arrays on the mesh, or without a mesh the
    host arrays in that layout.
    """
    ids = np.asarray(batch["input_ids"])
    b, T = ids.shape[0] // 2, ids.shape[1]
    local = {
        "input_ids": ids.reshape(2, b, T),  # (2b, T) -> (2, b, T)
        "margins": np.asarray(batch["margins"]),
    }
    shapes = {"input_ids": (2, batch_size, T), "margins": (batch_size,)}
    if lengths:
        local["lengths"] = np.asarray(batch["lengths"], np.int32).reshape(2, b)  # (2b,) -> (2, b)
        shapes["lengths"] = (2, batch_size)
    if mesh is None:
        return local
    shardings = batch_shardings(mesh, lengths)
    if jax.process_count() == 1:
        return {k: jax.device_put(v, shardings[k]) for k, v in local.items()}
    return {k: jax.make_array_from_process_local_data(shardings[k], v, shapes[k]) for k, v in local.items()}


def initialize_distributed(
    coordinator: str, num_processes: int, process_id: int, timeout_s: int = COORDINATOR_TIMEOUT_S
) -> None:
    """jax.distributed.initialize with a bounded wait; a clear error when the coordinator is unreachable.

    With coordinator="" the arguments are left to JAX's cluster detection (SLURM, Open MPI,
    TPU pods, or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables).
    """
    if coordinator and (":" not in coordinator or not coordinator.rsplit(":", 1)[1].isdigit()):
        raise ShardingError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    if coordinator and not (num_processes >= 1 and 0 <= process_id < num_processes):
        raise ShardingError(f"--process-id must be in [0, --num-processes={num_processes}), got {process_id}")
    # CPU collectives across processes (no effect on GPU / TPU); set before the backend starts
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = (
        dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
        if coordinator
        else {}
    )
    if coordinator and process_id != 0:
        # JAX aborts the whole process (not an exception) when it cannot register with the
        # coordinator, so check first that something listens there, for up to timeout_s
        _wait_for_coordinator(coordinator, timeout_s, process_id, num_processes)
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=timeout_s)
    except Exception as e:
        where = coordinator or "the address found by cluster detection"
        raise ShardingError(
            f"could not join the JAX distributed job at {where} as process {process_id} of "
            f"{num_processes} within {timeout_s} s: {str(e).splitlines()[0] if str(e) else e!r}. "
            f"Check that process 0 is running, the address and port are reachable, and "
            f"--num-processes is the same everywhere."
        ) from e


def _wait_for_coordinator(coordinator: str, timeout_s: float, process_id: int, num_processes: int) -> None:
    host, port = coordinator.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, timeout_s)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ShardingError(
                    f"cannot reach the coordinator {coordinator} (process 0) from process "
                    f"{process_id} of {num_processes} within {timeout_s:g} s: {e}. Start process 0 "
                    f"with the same --coordinator, and check the host, port and firewall."
                ) from None
            time.sleep(0.5)
