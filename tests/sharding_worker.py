"""Run by tests/test_sharding.py in a subprocess, with XLA_FLAGS forcing N CPU devices.

python tests/sharding_worker.py equivalence OUT.json
    10 steps on one device, then on meshes data=8, fsdp=8, data=2 x fsdp=4: per-step losses,
    final params, shard shapes; 3 bfloat16 steps on one device and on data=2 x fsdp=4; the
    data=2 x fsdp=4 state checkpointed and restored onto a 4-device fsdp mesh.
python tests/sharding_worker.py run OUT.json DATA FSDP [COORDINATOR NUM_PROCESSES PROCESS_ID]
    10 steps on a DATA x FSDP mesh, every process loading only its rows of each batch
    (for trying things by hand; the tests run two processes through `jaxrm train`).
"""

import json
import sys

import jax

jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402

from jaxrm import sharding as shd  # noqa: E402
from jaxrm.config import ModelConfig, TrainConfig  # noqa: E402
from jaxrm.data import BatchIterator, EncodedPairs  # noqa: E402
from jaxrm.state import abstract_train_state, init_train_state  # noqa: E402
from jaxrm.step import make_train_step  # noqa: E402

# the tests' tiny byte-vocab model, dropout on: a mesh must draw the same masks as one device
MODEL = ModelConfig(
    vocab_size=257,
    d_model=32,
    block_size=32,
    num_heads=4,
    dff=64,
    num_layer=2,
    embed_pdrop=0.1,
    attn_pdrop=0.1,
    resid_pdrop=0.1,
    dropout=0.1,
    attention_block=8,
)
TRAIN = TrainConfig(batch_size=16, max_steps=10, warmup_steps=2, learning_rate=3e-3, min_lr=3e-4)
STEPS = 10


def pairs(n=64, T=24, seed=0) -> EncodedPairs:
    """Random pairs with a shared prompt, different lengths, some identical pairs."""
    rng = np.random.default_rng(seed)
    pad = MODEL.pad_id
    chosen, rejected = np.full((n, T), pad, np.int32), np.full((n, T), pad, np.int32)
    lc, lr = rng.integers(6, T + 1, n), rng.integers(6, T + 1, n)
    for i in range(n):
        prompt = rng.integers(0, 256, 4)
        chosen[i, : lc[i]] = np.concatenate([prompt, rng.integers(0, 256, lc[i] - 4)])
        rejected[i, : lr[i]] = np.concatenate([prompt, rng.integers(0, 256, lr[i] - 4)])
        if i % 13 == 0:
            rejected[i], lr[i] = chosen[i], lc[i]
    return EncodedPairs(
        chosen_ids=chosen,
        rejected_ids=rejected,
        chosen_lengths=lc.astype(np.int32),
        rejected_lengths=lr.astype(np.int32),
        margins=rng.random(n).astype(np.float32),
    )


def train(mesh, tc=TRAIN, steps=STEPS, model=MODEL):
    state = shd.shard_state(init_train_state(model, tc, seed=0), mesh)
    step = make_train_step(model, tc, mesh)
    batches = BatchIterator(
        pairs(), tc.batch_size, seed=1, pad_multiple=8, rows=shd.process_rows(mesh, tc.batch_size)
    )
    losses = []
    for _ in range(steps):
        state, metrics = step(state, shd.shard_batch(next(batches), mesh, tc.batch_size))
        losses.append(float(metrics["loss"]))
    return state, losses


def flat_params(state) -> dict:
    from jaxrm.checkpoint import flatten

    return {k: np.asarray(jax.device_get(v)) for k, v in flatten(state.params).items()}


def gather(state):
    """Params as host numpy (all processes take part: multihost gather of a sharded state)."""
    from jax.experimental import multihost_utils

    return flat_params(multihost_utils.process_allgather(state, tiled=True))


def shard_shapes(state) -> dict:
    from jaxrm.checkpoint import flatten

    return {k: [list(s.data.shape) for s in v.addressable_shards] for k, v in flatten(state).items()}


def equivalence(out):
    import tempfile

    from jaxrm.checkpoint import Checkpointer

    result, params = {"devices": jax.device_count()}, {}
    ref_state, result["1"] = train(None)
    params["1"] = flat_params(ref_state)
    for data, fsdp in ((8, 1), (1, 8), (2, 4)):
        name = f"{data}x{fsdp}"
        state, result[name] = train(shd.make_mesh(data, fsdp))
        params[name] = flat_params(state)
        result[f"{name}_shards"] = shard_shapes(state)
    # bf16 (its backward matmuls run through jaxrm.model's custom VJP and row-major copies)
    bf16 = MODEL.replace(dtype="bfloat16")
    result["bf16_1"] = train(None, steps=3, model=bf16)[1]
    result["bf16_2x4"] = train(shd.make_mesh(2, 4), steps=3, model=bf16)[1]

    # checkpoint: save the data=2 x fsdp=4 state (8 devices), restore onto fsdp=4 (4 devices)
    with tempfile.TemporaryDirectory() as d:
        ckpt = Checkpointer(d)
        ckpt.save(STEPS, state, {"note": "sharded"})
        mesh4 = shd.make_mesh(1, 4, devices=jax.devices()[:4])
        target = shd.abstract_with_shardings(abstract_train_state(MODEL, TRAIN), mesh4)
        restored, meta = ckpt.restore(target)
        ckpt.close()
    params["restored"] = flat_params(restored)
    result["restore"] = {
        "step": int(restored.step),
        "meta": meta,
        "devices": sorted({d.id for leaf in jax.tree.leaves(restored) for d in leaf.sharding.device_set}),
        "shards": shard_shapes(restored),
    }
    # and training goes on from it on the 4-device mesh
    restored, metrics = make_train_step(MODEL, TRAIN, mesh4)(
        restored,
        shd.shard_batch(
            next(BatchIterator(pairs(), TRAIN.batch_size, seed=1, pad_multiple=8)), mesh4, TRAIN.batch_size
        ),
    )
    result["restore"]["next_loss"] = float(metrics["loss"])
    json.dump(result, open(out, "w"))
    np.savez(out + ".npz", **{f"{name}/{k}": v for name, p in params.items() for k, v in p.items()})


def run(out, data, fsdp, coordinator=None, num_processes=1, process_id=0):
    if coordinator:
        shd.initialize_distributed(coordinator, int(num_processes), int(process_id), timeout_s=60)
    mesh = shd.make_mesh(int(data), int(fsdp))
    state, losses = train(mesh)
    params = gather(state)
    result = {
        "process_count": jax.process_count(),
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "rows": list(shd.process_rows(mesh, TRAIN.batch_size)),
        "losses": losses,
        "local_shards": shard_shapes(state.params),
    }
    json.dump(result, open(out, "w"))
    np.savez(out + ".npz", **params)
    if coordinator:
        jax.distributed.shutdown()


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"equivalence": equivalence, "run": run}[mode](*args)
