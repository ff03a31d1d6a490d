"""Training: a pure, jitted train_step over a donated TrainState, an eval step, and the fit loop."""
from __future__ import annotations

import json
import math
import os
import pathlib
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxrm.config import ModelConfig, RunConfig, TrainConfig
from jaxrm.loss import identical_pairs, pairwise_loss
from jaxrm.model import RewardModel
from jaxrm.optim import learning_rate, make_optimizer


@flax.struct.dataclass
class TrainState:
    step: jax.Array    # () int32: optimizer steps taken (skipped non-finite steps included)
    params: Any        # nested dict of float32 arrays (nnx pure dict of the model's Params)
    opt_state: Any
    rng: jax.Array     # (2,) uint32 base key; step s uses fold_in(rng, s) for dropout


def split_model(model: RewardModel):
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(params)


def model_graphdef(model_config: ModelConfig):
    return nnx.split(nnx.eval_shape(lambda: RewardModel(model_config, rngs=nnx.Rngs(0))), nnx.Param)[0]


def merge_model(model_config: ModelConfig, params) -> RewardModel:
    return nnx.merge(model_graphdef(model_config), params)


def init_train_state(model_config: ModelConfig, train_config: TrainConfig, seed: int = 0,
                     model: RewardModel | None = None) -> TrainState:
    """A fresh state: the given model's weights, or a new init from `seed`."""
    model = model if model is not None else RewardModel(model_config, rngs=nnx.Rngs(seed))
    _, params = split_model(model)
    optimizer = make_optimizer(train_config, params)
    return TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(jax.random.key(seed + 1)))


def _has_dropout(config: ModelConfig) -> bool:
    return any((config.embed_pdrop, config.attn_pdrop, config.resid_pdrop, config.dropout))


def _loss_options(tc: TrainConfig, margins, lengths=None):
    return dict(loss_type=tc.loss_type, margins=margins if tc.use_margins else None,
                center_rewards_coef=tc.center_rewards_coef, normalize_by=tc.normalize_by, lengths=lengths)


def _batch_lengths(tc: TrainConfig, batch: dict):
    """The batch's (2B,) lengths with lengths="explicit"; None (ends at the first PAD) otherwise."""
    if tc.lengths != "explicit":
        return None
    if batch.get("lengths") is None:
        raise ValueError('lengths="explicit" needs batches with "lengths" ((2B,) int32, chosen rows then rejected)')
    return batch["lengths"]


def _micro_batches(batch: dict, k: int) -> dict:
    """Chosen-then-rejected rows (2B, ...) -> (k, 2B/k, ...), each micro-batch keeping its pairs
    whole (input_ids and lengths); margins (B,) -> (k, B/k)."""
    B = batch["input_ids"].shape[0] // 2

    def split(rows):  # (2B, ...) -> (k, 2B/k, ...): micro-batch i holds chosen i-th B/k, then rejected
        chosen = rows[:B].reshape(k, B // k, *rows.shape[1:])     # (k, B/k, ...)
        rejected = rows[B:].reshape(k, B // k, *rows.shape[1:])   # (k, B/k, ...)
        return jnp.concatenate([chosen, rejected], axis=1)

    micro = {"input_ids": split(batch["input_ids"]), "margins": batch["margins"].reshape(k, B // k)}
    if batch.get("lengths") is not None:
        micro["lengths"] = split(batch["lengths"])
    return micro


def pair_metrics(out, valid=None) -> dict:
    """Batch statistics over the pairs that count (non-identical, and valid when given)."""
    counted = ~out.identical if valid is None else (~out.identical & valid)
    n = jnp.maximum(counted.sum(), 1)
    mean = lambda x: jnp.where(counted, x, 0.0).sum() / n
    std = lambda x: jnp.sqrt(mean((x - mean(x)) ** 2))
    c, r = out.chosen_end_scores, out.rejected_end_scores
    return {"accuracy": mean((c > r).astype(jnp.float32)), "margin": mean(c - r),
            "chosen_mean": mean(c), "chosen_std": std(c), "rejected_mean": mean(r), "rejected_std": std(r)}


def make_train_step(model_config: ModelConfig, train_config: TrainConfig, mesh=None):
    """jit(train_step)(state, batch) -> (state, metrics), the state donated.

    batch: {"input_ids": (2B, T) int32 chosen rows then rejected rows, "margins": (B,) float32,
    and with train_config.lengths="explicit" "lengths": (2B,) int32, each row's number of real tokens}.
    With grad_accum_steps = k the batch is cut into k micro-batches of whole pairs and the
    gradient is the exact full-batch gradient: every micro-batch's loss sum is divided by the
    full batch's denominator. A step whose loss or gradient norm is not finite leaves params and
    optimizer state untouched and reports finite=False.

    With a `mesh` (jaxrm.sharding.make_mesh) the state must be placed with
    jaxrm.sharding.shard_state and the batch with jaxrm.sharding.shard_batch (input_ids
    (2, B, T) and lengths (2, B), sharded on the pair axis). The model then runs on the pairs interleaved
    (chosen_0, rejected_0, chosen_1, ...) so each device computes whole pairs; rewards are
    regrouped to chosen-then-rejected for the loss. One device runs the same interleaved layout
    and dropout masks are a function of each element's index (jaxrm.model.dropout_bits), so a
    sharded run computes the same function as one device, dropout included.
    """
    tc, pad_id, k = train_config, model_config.pad_id, train_config.grad_accum_steps
    graphdef = model_graphdef(model_config)
    dropout = _has_dropout(model_config)
    if mesh is not None:
        from jaxrm import sharding as shd
        shd.batch_size_per_shard(mesh, tc.batch_size, k)
        pairs_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(shd.BATCH_AXES))

    def apply_model(model, ids, key):
        """The model runs on the pairs interleaved (chosen_0, rejected_0, chosen_1, ...), on one
        device too, so that a mesh splitting it by pair draws the same dropout masks."""
        n, T = ids.shape
        pairs = ids.reshape(2, n // 2, T).swapaxes(0, 1).reshape(n, T)  # (B, 2, T) -> (2B, T) interleaved
        if mesh is not None:
            pairs = jax.lax.with_sharding_constraint(pairs, pairs_sharding)
        rewards = model(pairs, deterministic=not dropout, rngs=nnx.Rngs(dropout=key))
        return rewards.reshape(n // 2, 2, T).swapaxes(0, 1).reshape(n, T)  # back to chosen then rejected

    def objective(params, micro, key, denominator, num_counted):
        model = nnx.merge(graphdef, params)
        rewards = apply_model(model, micro["input_ids"], key)
        out = pairwise_loss(rewards, micro["input_ids"], pad_id,
                            **_loss_options(tc, micro["margins"], _batch_lengths(tc, micro)))
        value = out.per_pair_loss.sum() / denominator
        if tc.center_rewards_coef:
            value = value + tc.center_rewards_coef * out.centered.sum() / num_counted
        return value, out

    def train_step(state: TrainState, batch: dict):
        if batch["input_ids"].ndim == 3:  # sharded layout (2, B, T) -> (2B, T) chosen then rejected
            batch = {**batch, "input_ids": batch["input_ids"].reshape(-1, batch["input_ids"].shape[-1])}
            if batch.get("lengths") is not None:  # (2, B) -> (2B,)
                batch["lengths"] = batch["lengths"].reshape(-1)
        ids = batch["input_ids"]
        B = ids.shape[0] // 2
        num_counted = jnp.maximum((~identical_pairs(ids, pad_id, _batch_lengths(tc, batch))).sum(), 1
                                  ).astype(jnp.float32)
        denominator = jnp.float32(B) if tc.normalize_by == "pairs" else num_counted
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        grad_fn = jax.value_and_grad(objective, has_aux=True)
        if k == 1:
            (loss, out), grads = grad_fn(state.params, batch, key, denominator, num_counted)
        else:
            def accumulate(grads, xs):
                micro, i = xs
                (value, out), g = grad_fn(state.params, micro, jax.random.fold_in(key, i), denominator, num_counted)
                return jax.tree.map(jnp.add, grads, g), (value, out)
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            grads, (values, outs) = jax.lax.scan(accumulate, zeros, (_micro_batches(batch, k), jnp.arange(k)))
            loss = values.sum()
            out = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]) if x.ndim > 1 else x.sum(), outs)
        grad_norm = optax.tree.norm(grads)
        optimizer = make_optimizer(tc, state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                               opt_state=keep(opt_state, state.opt_state), rng=state.rng)
        lr = learning_rate(state.step, peak=tc.learning_rate, min_lr=tc.min_lr,
                           warmup_steps=tc.warmup_steps, decay_steps=tc.decay_steps)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr, "finite": finite, **pair_metrics(out)}
        return new_state, metrics

    if mesh is None:
        return _jit_step(train_step, tc)
    state_shardings = shd.state_shardings(abstract_train_state(model_config, train_config), mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch_shardings = shd.batch_shardings(mesh, lengths=tc.lengths == "explicit")
    return _jit_step(train_step, tc, in_shardings=(state_shardings, batch_shardings),
                     out_shardings=(state_shardings, replicated))


def _jit_step(train_step, tc: TrainConfig, **shardings):
    """jit(train_step) with the state donated; with tc.debug_checks, a host-side wrapper around it
    that raises TrainingError naming the step and the fault (one device sync per step: debugging only).

    checkify: the step runs under jax.experimental.checkify with index (out-of-range gathers, e.g. a
    token id >= vocab_size, which the model otherwise turns into NaN), NaN, division and user checks.
    nans: the step runs with jax_debug_nans (no donation: on a NaN JAX re-runs the step op by op).
    """
    if tc.debug_checks == "off":
        return jax.jit(train_step, donate_argnums=0, **shardings)
    if tc.debug_checks == "nans":
        step = jax.jit(train_step, **shardings)

        def debug_nans_step(state, batch):
            number = int(np.asarray(state.step.addressable_shards[0].data)) + 1
            try:
                with jax.debug_nans(True):
                    return step(state, batch)
            except (FloatingPointError, ValueError) as e:  # ValueError: the op-by-op re-run's input checks
                raise TrainingError(f"debug_checks=nans: step {number}: {type(e).__name__}: {e}") from None
        return debug_nans_step

    from jax.experimental import checkify
    errors = checkify.index_checks | checkify.nan_checks | checkify.div_checks | checkify.user_checks
    if "out_shardings" in shardings:  # the error value is replicated, like the metrics
        shardings = {**shardings, "out_shardings": (shardings["out_shardings"][1], shardings["out_shardings"])}
    step = jax.jit(checkify.checkify(train_step, errors=errors), donate_argnums=0, **shardings)

    def checkified_step(state, batch):
        err, (new_state, metrics) = step(state, batch)
        try:
            err.throw()
        except checkify.JaxRuntimeError as e:
            number = int(np.asarray(new_state.step.addressable_shards[0].data))
            raise TrainingError(f"debug_checks=checkify: step {number}: {str(e).strip()}") from None
        return new_state, metrics
    return checkified_step


def make_eval_step(model_config: ModelConfig, train_config: TrainConfig):
    """jit(eval_step)(params, batch) -> per-pair end scores, loss terms and identical flags.
    batch: input_ids (2B, T), margins (B,), lengths (2B,) (used with train_config.lengths="explicit")."""
    graphdef = model_graphdef(model_config)

    def eval_step(params, batch):
        model = nnx.merge(graphdef, params)
        rewards = model(batch["input_ids"], deterministic=True)
        out = pairwise_loss(rewards, batch["input_ids"], model_config.pad_id,
                            **_loss_options(train_config, batch["margins"], _batch_lengths(train_config, batch)))
        return {"chosen": out.chosen_end_scores, "rejected": out.rejected_end_scores,
                "identical": out.identical, "loss": out.per_pair_loss}

    return jax.jit(eval_step)


def evaluate(eval_step, params, data, batch_size: int, limit: int = 0) -> dict:
    """Accuracy, loss, margin and reward statistics over `data` (the first `limit` pairs if > 0)."""
    from jaxrm.data import eval_batches
    chosen, rejected, identical, losses = [], [], [], []
    seen = 0
    for batch in eval_batches(data, batch_size):
        out = jax.device_get(eval_step(params, {k: batch[k] for k in ("input_ids", "margins", "lengths")}))
        valid = batch["valid"]
        chosen.append(out["chosen"][valid])
        rejected.append(out["rejected"][valid])
        identical.append(out["identical"][valid])
        losses.append(out["loss"][valid])
        seen += int(valid.sum())
        if limit and seen >= limit:
            break
    c, r, same, loss = (np.concatenate(x) for x in (chosen, rejected, identical, losses))
    c, r, loss = c[~same], r[~same], loss[~same]
    return {"pairs": int(len(c)), "accuracy": float(np.mean(c > r)), "loss": float(np.mean(loss)),
            "margin": float(np.mean(c - r)), "chosen_mean": float(c.mean()), "chosen_std": float(c.std()),
            "rejected_mean": float(r.mean()), "rejected_std": float(r.std())}


def abstract_train_state(model_config: ModelConfig, train_config: TrainConfig) -> TrainState:
    """Shapes and dtypes of a TrainState, without computing one (a restore target)."""
    return jax.eval_shape(lambda: init_train_state(model_config, train_config, 0))


# -----------------------------------------------------------------------------
# the fit loop

class TrainingError(RuntimeError):
    pass


class Preempted(RuntimeError):
    """SIGTERM/SIGINT arrived; a checkpoint of the current step was saved."""


# keys that may change between a run and its resume; any other difference is another run
RESUMABLE_CHANGES = {"max_steps", "eval_every", "eval_pairs", "checkpoint_every", "keep_checkpoints", "log_every",
                     "nonfinite", "max_nonfinite_skips", "mesh_data", "mesh_fsdp", *ModelConfig.PLAN_FIELDS,
                     "deterministic", "debug_checks"}


def _config_differences(saved: dict, run: RunConfig) -> list[str]:
    current = run.to_dict()
    try:  # config keys added since the checkpoint was written count as their defaults
        saved = RunConfig.from_dict(saved).to_dict()
    except (TypeError, ValueError):
        pass
    return [f"{section}.{key}: checkpoint has {saved[section].get(key)!r}, this run {value!r}"
            for section in ("model", "train") for key, value in current[section].items()
            if saved.get(section, {}).get(key) != value and key not in RESUMABLE_CHANGES]


def load_split(run: RunConfig, tokenizer, path: str, source: str):
    """Pairs of a file, tokenized and padded to the run's seq_len; (EncodedPairs, stats)."""
    from jaxrm.data import encode_pairs
    seq_len = run.train.seq_len or run.model.block_size
    if seq_len > run.model.block_size:
        raise ValueError(f"seq_len={seq_len} exceeds the model's block_size={run.model.block_size}")
    from jaxrm.formats import Columns, load_pairs
    return encode_pairs(load_pairs(path, Columns.from_train_config(run.train)), tokenizer, seq_len=seq_len,
                        pad_id=run.model.pad_id,
                        vocab_size=run.model.vocab_size, truncation=run.train.truncation, source=source,
                        lengths=run.train.lengths)


def fit(run: RunConfig, out_dir, init_model: RewardModel | None = None, log=None) -> dict:
    """Train `run` into `out_dir`, resuming from its latest checkpoint if there is one.

    Writes config.json, metrics.jsonl, checkpoints/, model.safetensors, curves.png and
    summary.json. Returns the summary (final validation and test metrics, wall time).
    """
    import signal

    from jaxrm import rundir
    from jaxrm import sharding as shd
    from jaxrm.checkpoint import Checkpointer
    from jaxrm.data import BatchIterator, bundled_data_path
    from jaxrm.optim import describe_decay
    from jaxrm.report import MetricsLog, Progress, plot_curves
    from jaxrm.tokenizer import get_tokenizer

    started = time.time()
    tc, mc = run.train, run.model
    mesh = shd.make_mesh(tc.mesh_data, tc.mesh_fsdp)     # None: one device, the unsharded path
    shd.batch_size_per_shard(mesh, tc.batch_size, tc.grad_accum_steps)
    primary = jax.process_index() == 0                    # writes metrics, config, weights
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(tc.max_steps, tc.log_every)
    say = log or (progress.message if primary else (lambda message: None))

    if tc.deterministic:  # the CLI already set it before JAX started; a library caller is warned if too late
        from jaxrm.runtime import use_deterministic_ops
        applied = use_deterministic_ops()
        say(f"deterministic: XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}" + ("" if applied else " (set too late)"))
    tokenizer = get_tokenizer(tc.tokenizer)
    if tokenizer.vocab_size > mc.vocab_size:
        raise ValueError(f"tokenizer {tc.tokenizer!r} has {tokenizer.vocab_size} ids but the model's vocab_size is "
                         f"{mc.vocab_size}; set vocab_size >= {tokenizer.vocab_size}")
    train_path = tc.data or str(bundled_data_path("train"))
    train_data, stats = load_split(run, tokenizer, train_path, train_path)
    say(f"train data {train_path}: {stats['pairs_kept']} pairs (dropped {stats['dropped_too_long']} too long, "
        f"{stats['dropped_identical']} identical)")
    val_path = tc.eval_data or ("" if tc.data else str(bundled_data_path("validation")))
    val_data = load_split(run, tokenizer, val_path, val_path)[0] if val_path else None

    checkpoints = Checkpointer(out / rundir.CHECKPOINTS, keep=tc.keep_checkpoints)
    rows = shd.process_rows(mesh, tc.batch_size)          # this process's pairs of each global batch
    batches = BatchIterator(train_data, tc.batch_size, seed=tc.seed, group_by_length=tc.group_by_length,
                            pad_multiple=tc.pad_multiple, rows=None if rows == (0, tc.batch_size) else rows)
    resume_step = checkpoints.latest_intact_step(say)  # skips (and reports) incomplete or corrupt steps
    if resume_step is not None:
        saved = checkpoints.read_meta(resume_step)
        differences = _config_differences(saved.get("config", {}), run)
        if differences:
            raise TrainingError(f"{out} holds a run with another config ({'; '.join(differences)}); "
                                f"use another --out or the same settings")
        target = shd.abstract_with_shardings(abstract_train_state(mc, tc), mesh)  # onto this run's mesh
        state, meta = checkpoints.restore(target, resume_step)
        batches.restore(meta["data"])
        say(f"resumed from {out / rundir.CHECKPOINTS} step {resume_step}")
    else:
        state = shd.shard_state(init_train_state(mc, tc, tc.seed, model=init_model), mesh)
        if primary:
            rundir.write_config(out, run)
        say(describe_decay(state.params))
    if mesh is not None:  # every process says which rows it loads
        (log or progress.message)(f"mesh data={tc.mesh_data} x fsdp={tc.mesh_fsdp} over {jax.device_count()} devices, "
            f"{jax.process_count()} process(es); this process loads pairs {rows[0]}..{rows[1] - 1} of each batch")
    metrics_log = MetricsLog(out / rundir.METRICS if primary else os.devnull, resume_step)

    train_step = make_train_step(mc, tc, mesh)
    eval_step = make_eval_step(mc, tc)

    def host_params():
        """Params for evaluation and export: as they are on one device, gathered from the mesh."""
        if mesh is None:
            return state.params
        from jax.experimental import multihost_utils
        return jax.device_put(multihost_utils.process_allgather(state.params, tiled=True), jax.local_devices()[0])

    def save(step_done: int, data_position: dict):
        checkpoints.save(step_done, state, {"config": run.to_dict(), "data": data_position})

    stop_signal = []
    handlers = {sig: signal.signal(sig, lambda signum, frame: stop_signal.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    pending = None          # (step index, metrics on device, tokens in its batch)
    skipped_in_a_row = 0
    last_time = time.time()

    def consume(item):
        nonlocal skipped_in_a_row, last_time
        index, metrics, tokens = item
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.time()
        metrics["tokens_per_s"] = tokens / max(now - last_time, 1e-9)
        last_time = now
        if not metrics.pop("finite"):
            where = f"step {index + 1}: loss {metrics['loss']}, grad norm {metrics['grad_norm']}"
            latest = checkpoints.latest_step()
            if tc.nonfinite == "stop":
                raise TrainingError(f"non-finite loss or gradient at {where}; parameters were not updated. "
                                    f"Last good checkpoint: step {latest} in {checkpoints.directory}. "
                                    f"Use --nonfinite=skip to skip such steps.")
            skipped_in_a_row += 1
            say(f"skipped non-finite {where} ({skipped_in_a_row} in a row)")
            if skipped_in_a_row > tc.max_nonfinite_skips:
                raise TrainingError(f"{skipped_in_a_row} non-finite steps in a row (limit max_nonfinite_skips="
                                    f"{tc.max_nonfinite_skips}), last at {where}; last good checkpoint: step {latest}")
        else:
            skipped_in_a_row = 0
        metrics_log.write({"kind": "train", "step": index + 1, **metrics})
        if primary:
            progress.update(index + 1, metrics)

    try:
        step = int(state.step)
        while step < tc.max_steps:
            batch = next(batches)
            state, metrics = train_step(state, shd.shard_batch(batch, mesh, tc.batch_size,
                                                               lengths=tc.lengths == "explicit"))
            if pending is not None:
                consume(pending)  # one step late: the device is already busy with this step
            pending = (step, metrics, batch["input_ids"].size * jax.process_count())
            step += 1
            at_end = step == tc.max_steps
            if step % tc.checkpoint_every == 0 or at_end or stop_signal:
                consume(pending)
                pending = None
                save(step, batches.state())
            if val_data is not None and (step % tc.eval_every == 0 or at_end):
                result = evaluate(eval_step, host_params(), val_data, tc.batch_size * 4, tc.eval_pairs)
                metrics_log.write({"kind": "eval", "step": step, **result})
                say(f"step {step}: validation accuracy {result['accuracy']:.4f} loss {result['loss']:.4f} "
                    f"({result['pairs']} pairs)")
            if stop_signal:
                raise Preempted(f"received signal {stop_signal[0]}: saved checkpoint step {step} in "
                                f"{checkpoints.directory}; run the same command again to resume")
        if pending is not None:
            consume(pending)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)

    params = host_params()
    if primary:
        rundir.export_weights(out, merge_model(mc, params))
        plot_curves(out / rundir.METRICS, out / rundir.CURVES)
    summary = {"steps": int(state.step), "train_pairs": len(train_data)}
    if val_data is not None:
        summary["validation"] = evaluate(eval_step, params, val_data, tc.batch_size * 4)
    if not tc.data:
        test_data = load_split(run, tokenizer, str(bundled_data_path("test")), "test")[0]
        summary["test"] = evaluate(eval_step, params, test_data, tc.batch_size * 4)
    summary["wall_time_s"] = round(time.time() - started, 1)  # training and the final evaluation
    if primary:
        (out / rundir.SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    checkpoints.close()
    return summary
