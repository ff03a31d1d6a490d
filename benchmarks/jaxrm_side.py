"""jaxrm's side: its train step and its scoring call, compiled ahead of time, ready to time;
and the train step's memory under each execution plan, from XLA's buffer assignment.

Train step = forward + pairwise loss + backward + clip + AdamW, as `jaxrm train` runs it.
Score = the rewards at each row's last real token, as `jaxrm score` runs it.
Rewards = the reward at every position (what the original's forward computes), jitted.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.cases import Case, model_config

# every jaxrm name this file uses, in one place
from jaxrm.config import TrainConfig
from jaxrm.loss import sequence_ends
from jaxrm.model import RewardModel
from jaxrm.plan import execution_plan
from jaxrm.sharding import shard_batch
from jaxrm.state import abstract_train_state, init_train_state
from jaxrm.step import make_train_step


def _compile_ahead(jitted, *args):
    """(compiled, seconds): trace, lower and XLA-compile ahead of time, so that compile time is
    its own figure, apart from the first step."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def _plan(cfg, case: Case) -> dict:
    """The execution plan jaxrm picks for this case's (2 * pairs, T) input."""
    plan = execution_plan(cfg, 2 * case.pairs, case.T)
    return {"scan_layers": plan.scan_layers, "remat": plan.remat}


def _prepare_train(cfg, case: Case, jbatch: dict):
    tc = TrainConfig(batch_size=case.pairs)
    state = init_train_state(cfg, tc, seed=0)
    plan = _plan(cfg, case)
    step, plan["compile_s"] = _compile_ahead(make_train_step(cfg, tc), state, jbatch)
    holder = [state]

    def one():
        holder[0], metrics = step(holder[0], jbatch)
        jax.block_until_ready(metrics)

    step_fn = f"{make_train_step.__module__}.{make_train_step.__qualname__}"
    return one, {"step_fn": step_fn, **plan}


def _prepare_score(cfg, case: Case, jbatch: dict):
    plan = _plan(cfg, case)
    model = RewardModel(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def score(params, ids):  # what jaxrm.score runs: the rewards at each row's last real token
        scores = nnx.merge(graphdef, params).scores_at(ids, sequence_ends(ids, cfg.pad_id) - 1)  # (2B,)
        return scores[: case.pairs], scores[case.pairs :]

    ids = jbatch["input_ids"]
    score, plan["compile_s"] = _compile_ahead(score, params, ids)
    return (lambda: jax.block_until_ready(score(params, ids))), plan


def _prepare_rewards(cfg, case: Case, jbatch: dict):
    plan = _plan(cfg, case)
    model = RewardModel(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    rewards = jax.jit(lambda params, ids: nnx.merge(graphdef, params)(ids))  # (2B, T): every position
    ids = jbatch["input_ids"]
    rewards, plan["compile_s"] = _compile_ahead(rewards, params, ids)
    return (lambda: jax.block_until_ready(rewards(params, ids))), plan


def prepare_jax(case: Case, batch: dict, mode: str):
    """(one, info): one() runs a train step ("train"), a scoring call ("score": end scores) or the
    per-position rewards ("rewards") and blocks until it is done; info: the execution plan,
    compile seconds (and the step function)."""
    cfg = model_config(case)
    if mode == "train":  # the train step's layout: ids (2, B, T), chosen then rejected
        step_batch = shard_batch(batch, None, case.pairs)
        return _prepare_train(cfg, case, {k: jnp.asarray(v) for k, v in step_batch.items()})
    prepare = _prepare_score if mode == "score" else _prepare_rewards
    return prepare(cfg, case, {k: jnp.asarray(v) for k, v in batch.items()})


REMAT_PLANS = (("off", "none"), ("on", "none"), ("on", "attention"), ("on", "block"))


def plan_memory(preset: str, pairs: int, T: int, plans=REMAT_PLANS) -> list[dict]:
    """Train-step memory of each execution plan (layer scan x rematerialization), from XLA's buffer
    assignment of the compiled step: exact and independent of load. Compiles, never runs, so even
    plans too large for this machine are reported."""
    case = Case(preset, preset, pairs, T, "float32")
    tc = TrainConfig(batch_size=pairs)
    batch = {
        "input_ids": jax.ShapeDtypeStruct((2, pairs, T), jnp.int32),  # the train step's layout
        "margins": jax.ShapeDtypeStruct((pairs,), jnp.float32),
    }
    rows = []
    for scan, remat in plans:
        cfg = model_config(case).replace(scan_layers=scan, remat=remat)
        t0 = time.perf_counter()
        compiled = make_train_step(cfg, tc).lower(abstract_train_state(cfg, tc), batch).compile()
        mem = compiled.memory_analysis()
        rows.append(
            {
                "preset": preset,
                "pairs": pairs,
                "T": T,
                "scan_layers": scan,
                "remat": remat,
                "temp_mb": mem.temp_size_in_bytes / 2**20,
                "argument_mb": mem.argument_size_in_bytes / 2**20,
                "compile_s": time.perf_counter() - t0,
            }
        )
        print(
            f"# memory {preset} {pairs}x{T} scan={scan} remat={remat}: temp {rows[-1]['temp_mb']:.0f} MB "
            f"(compile {rows[-1]['compile_s']:.1f}s)",
            flush=True,
        )
    return rows
