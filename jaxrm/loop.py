"""fit: train a RunConfig into a run directory, resuming from its latest checkpoint.

In the order fit uses them: RunLog (the one logging path), the run's data, resume_or_init
(config check and restore, or a fresh state), the loop (with Preemption and NonFinitePolicy),
then the export and the final evaluation.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

import jax
from jax.experimental import multihost_utils

from jaxrm import rundir
from jaxrm import sharding as shd
from jaxrm.checkpoint import Checkpointer
from jaxrm.config import EVAL_BATCH_SIZE, RANKING_LOSSES, ModelConfig, RunConfig, TrainConfig
from jaxrm.data import BatchIterator, bundled_data_path, load_split
from jaxrm.dataid import data_change, data_identity
from jaxrm.evaluate import evaluate
from jaxrm.formats import DataError
from jaxrm.model import RewardModel
from jaxrm.optim import describe_decay, learning_rate
from jaxrm.ranking_data import load_ranking_split
from jaxrm.ranking_eval import evaluate_rankings, ranking_outputs
from jaxrm.ranking_step import check_ranking_step, make_ranking_eval_step, make_ranking_train_step
from jaxrm.report import MetricsLog, Progress, TensorBoardLog, plot_curves
from jaxrm.runlock import RunLock
from jaxrm.runtime import use_deterministic_ops
from jaxrm.score import NORMALIZATION, reward_normalization, validation_normalization, write_normalization
from jaxrm.signals import Preemption
from jaxrm.state import TrainState, abstract_train_state, init_train_state, merge_model
from jaxrm.step import TrainingError, make_eval_step, make_train_step
from jaxrm.tokenizer import get_tokenizer


class Preempted(RuntimeError):
    """SIGTERM/SIGINT arrived; a checkpoint of the current step was saved."""


class RunLog:
    """The run's one logging path: messages and the progress line (process 0; a given `log`
    callable instead, on every process) and metrics.jsonl, one row per step and per evaluation."""

    def __init__(self, tc: TrainConfig, log=None):
        self.primary = jax.process_index() == 0  # writes metrics, config, weights
        self.progress = Progress(tc.max_steps, tc.log_every)
        self.log = log
        self.metrics = None  # MetricsLog, from open()
        self.tensorboard = None  # TensorBoardLog, from open() when tc.tensorboard
        self.tensorboard_on = tc.tensorboard
        self.last_time = time.time()

    def say(self, text: str, every_process: bool = False) -> None:
        if self.log is not None:
            self.log(text)
        elif self.primary or every_process:
            self.progress.message(text)

    def open(self, path, resume_step: int | None) -> None:
        """Start metrics.jsonl; when resuming, keep its rows up to `resume_step`."""
        self.metrics = MetricsLog(path if self.primary else os.devnull, resume_step)
        if self.tensorboard_on and self.primary:  # event files beside metrics.jsonl
            self.tensorboard = TensorBoardLog(pathlib.Path(path).parent, resume_step)
        self.last_time = time.time()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()

    def host_metrics(self, metrics: dict, tokens: int) -> dict:
        """A step's metrics as floats, with tokens_per_s since the previous step was read."""
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.time()
        metrics["tokens_per_s"] = tokens / max(now - self.last_time, 1e-9)
        self.last_time = now
        return metrics

    def train(self, step: int, metrics: dict) -> None:
        self.metrics.write({"kind": "train", "step": step, **metrics})
        if self.tensorboard is not None:
            self.tensorboard.write("train", step, metrics)
        if self.primary:
            self.progress.update(step, metrics)

    def eval(self, step: int, result: dict) -> None:
        self.metrics.write({"kind": "eval", "step": step, **result})
        if self.tensorboard is not None:
            self.tensorboard.write("validation", step, result)
        self.say(
            f"step {step}: validation accuracy {result['accuracy']:.4f} loss {result['loss']:.4f} "
            f"({result['pairs']} pairs)"
        )


class NonFinitePolicy:
    """TrainConfig.nonfinite, for a step whose loss or gradient norm was NaN / inf (the step left
    params and optimizer state as they were): "stop" raises TrainingError; "skip" goes on, up to
    max_nonfinite_skips such steps in a row."""

    def __init__(self, tc: TrainConfig, checkpoints: Checkpointer, say):
        self.tc, self.checkpoints, self.say = tc, checkpoints, say
        self.in_a_row = 0

    def check(self, step: int, metrics: dict) -> None:
        """Pops metrics["finite"]; for a non-finite step, raises or reports the skip."""
        if metrics.pop("finite"):
            self.in_a_row = 0
            return
        where = f"step {step}: loss {metrics['loss']}, grad norm {metrics['grad_norm']}"
        latest = self.checkpoints.latest_step()
        if self.tc.nonfinite == "stop":
            raise TrainingError(
                f"non-finite loss or gradient at {where}; parameters were not updated. "
                f"Last good checkpoint: step {latest} in {self.checkpoints.directory}. "
                f"Use --nonfinite=skip to skip such steps."
            )
        self.in_a_row += 1
        self.say(f"skipped non-finite {where} ({self.in_a_row} in a row)")
        if self.in_a_row > self.tc.max_nonfinite_skips:
            raise TrainingError(
                f"{self.in_a_row} non-finite steps in a row (limit max_nonfinite_skips="
                f"{self.tc.max_nonfinite_skips}), last at {where}; "
                f"last good checkpoint: step {latest}"
            )


# -----------------------------------------------------------------------------
# data and resume


def is_ranking_run(tc: TrainConfig) -> bool:
    """A run with a K-wise loss trains on ranked prompts (pairs read as K = 2); else on pairs."""
    return tc.loss_type in RANKING_LOSSES


def load_data(run: RunConfig, tokenizer, path: str):
    """(pairs or ranked prompts as the run trains on them, stats) of one file."""
    load = load_ranking_split if is_ranking_run(run.train) else load_split
    return load(run, tokenizer, path, path)


def _describe_train_data(path: str, stats: dict) -> str:
    if "rankings_kept" in stats:
        return (
            f"train data {path}: {stats['rankings_kept']} ranked prompts, {stats['ordered_pairs']} ordered "
            f"pairs, K up to {stats['max_k']} (dropped {stats['dropped_too_long']} too long, "
            f"{stats['dropped_no_preference']} without a preference)"
        )
    rankings = f" from {stats['from_rankings']} rankings" if stats.get("from_rankings") else ""
    return (
        f"train data {path}: {stats['pairs_kept']} pairs{rankings} (dropped {stats['dropped_too_long']} "
        f"too long, {stats['dropped_identical']} identical)"
    )


def load_run_data(run: RunConfig, say):
    """(tokenizer, train data, validation data or None, the train data's identity) of `run`: pairs
    (jaxrm.data), or ranked prompts for a K-wise loss (jaxrm.ranking_data); default: the bundled
    splits."""
    tc, mc = run.train, run.model
    tokenizer = get_tokenizer(tc.tokenizer)
    if tokenizer.vocab_size > mc.vocab_size:
        raise ValueError(
            f"tokenizer {tc.tokenizer!r} has {tokenizer.vocab_size} ids but the model's "
            f"vocab_size is {mc.vocab_size}; set vocab_size >= {tokenizer.vocab_size}"
        )
    train_path = tc.data or str(bundled_data_path("train"))
    train, stats = load_data(run, tokenizer, train_path)
    say(_describe_train_data(train_path, stats))
    if tc.use_margins and stats["with_margin"] < stats["pairs_kept"]:
        raise DataError(
            f"{train_path}: use_margins=true, but {stats['pairs_kept'] - stats['with_margin']} of "
            f"{stats['pairs_kept']} pairs have no margin (column {tc.margin_key!r}); give every pair a "
            f"margin, or train without --use_margins"
        )
    val_path = tc.eval_data or ("" if tc.data else str(bundled_data_path("validation")))
    validation = load_data(run, tokenizer, val_path)[0] if val_path else None
    return tokenizer, train, validation, data_identity(train_path, train)


# keys that may change between a run and its resume; any other difference is another run
RESUMABLE_CHANGES = {
    "max_steps",  # with the same schedule (check_schedule)
    "lr_decay_steps",
    "eval_every",
    "eval_pairs",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "tensorboard",
    "nonfinite",
    "max_nonfinite_skips",
    "mesh_data",
    "mesh_fsdp",
    *ModelConfig.PLAN_FIELDS,
    "deterministic",
    "debug_checks",
}


def config_differences(saved: dict, run: RunConfig) -> list[str]:
    """The settings in which a checkpoint's saved config differs from `run`, RESUMABLE_CHANGES
    apart; keys added since the checkpoint was written count as their defaults. A saved config
    that this version cannot read raises its TypeError / ValueError."""
    saved, current = RunConfig.from_dict(saved).to_dict(), run.to_dict()
    return [
        f"{section}.{key}: checkpoint has {saved[section].get(key)!r}, this run {value!r}"
        for section in ("model", "train")
        for key, value in current[section].items()
        if saved[section].get(key) != value and key not in RESUMABLE_CHANGES
    ]


def check_schedule(saved: TrainConfig, tc: TrainConfig, step: int, say) -> None:
    """A resume may change max_steps (and lr_decay_steps) only if the learning-rate schedule stays
    the same; says what happens to it, or raises TrainingError saying what would change and how to
    keep it."""
    if saved.decay_steps == tc.decay_steps:
        if saved.max_steps != tc.max_steps:
            say(
                f"max_steps {saved.max_steps} -> {tc.max_steps}: the learning-rate schedule is unchanged "
                f"(warmup {tc.warmup_steps} steps, cosine decay to min_lr {tc.min_lr:g} at step "
                f"{tc.decay_steps}, then flat)"
            )
        return
    lr = lambda c: float(
        learning_rate(
            step,
            peak=c.learning_rate,
            min_lr=c.min_lr,
            warmup_steps=c.warmup_steps,
            decay_steps=c.decay_steps,
        )
    )
    raise TrainingError(
        f"max_steps {saved.max_steps} -> {tc.max_steps} (lr_decay_steps {saved.lr_decay_steps} -> "
        f"{tc.lr_decay_steps}) changes the learning rate schedule, which decays over "
        f"{saved.decay_steps} steps: the lr of step {step + 1} would be {lr(tc):.3g} instead of "
        f"{lr(saved):.3g}. To keep the schedule add --lr_decay_steps={saved.decay_steps} (the lr stays "
        f"at min_lr={saved.min_lr:g} after step {saved.decay_steps}); or start a new run with another --out"
    )


def _check_resumable(
    checkpoints: Checkpointer,
    step: int,
    run: RunConfig,
    out: pathlib.Path,
    data: dict,
    allow_data_change: bool,
    say,
) -> None:
    where = checkpoints.step_dir(step)
    meta = checkpoints.read_meta(step)
    try:
        differences = config_differences(meta.get("config", {}), run)
        saved = RunConfig.from_dict(meta.get("config", {})).train
    except (TypeError, ValueError) as e:
        raise TrainingError(
            f"{where}: the checkpoint's config is not one this version of jaxrm can read "
            f"({e}); use another --out"
        ) from None
    if differences:
        raise TrainingError(
            f"{out} holds a run with another config ({'; '.join(differences)}); "
            f"use another --out or the same settings"
        )
    check_schedule(saved, run.train, step, say)
    change = data_change(meta.get("data_identity"), data)
    if change and not allow_data_change:
        raise TrainingError(
            f"{out}: the training data changed since checkpoint step {step}: {change}. Resume on it "
            f"anyway with --allow-data-change (the data order restarts from the saved position), or "
            f"use another --out"
        )
    if change:
        say(f"data changed, resuming anyway (--allow-data-change): {change}")


def resume_or_init(
    run: RunConfig,
    out: pathlib.Path,
    checkpoints: Checkpointer,
    batches: BatchIterator,
    mesh,
    init_model: RewardModel | None,
    log: RunLog,
    data: dict,
    allow_data_change: bool = False,
) -> tuple[TrainState, int | None]:
    """(state, resumed step): the latest intact checkpoint's, with `batches` moved to its data
    position, when its config, schedule and data (`data`: its identity) match `run`; else (a fresh
    state, None) and config.json written."""
    tc, mc = run.train, run.model
    step = checkpoints.latest_intact_step(log.say)  # skips (and reports) incomplete or corrupt steps
    if step is None:
        state = shd.shard_state(init_train_state(mc, tc, tc.seed, model=init_model), mesh)
        if log.primary:
            rundir.write_config(out, run)
        log.say(describe_decay(state.params))
        return state, None
    _check_resumable(checkpoints, step, run, out, data, allow_data_change, log.say)
    target = shd.abstract_with_shardings(abstract_train_state(mc, tc), mesh)  # onto this run's mesh
    state, meta = checkpoints.restore(target, step)
    position = meta["data"]  # with data allowed to change: the next epoch if the new data is shorter
    if isinstance(position.get("index"), int) and position["index"] > len(batches.data):
        position = {"epoch": position["epoch"] + 1, "index": 0}
    batches.restore(position)
    log.say(f"resumed from {out / rundir.CHECKPOINTS} step {step}")
    return state, step


# -----------------------------------------------------------------------------
# the loop


def host_params(params, mesh):
    """Params as they are on one device (for evaluation and export), gathered from the mesh."""
    if mesh is None:
        return params
    return jax.device_put(multihost_utils.process_allgather(params, tiled=True), jax.local_devices()[0])


class _Loop:
    """The steps of a run, with what they need: train / eval steps, batches, checkpoints, log."""

    def __init__(
        self, run: RunConfig, mesh, batches: BatchIterator, checkpoints: Checkpointer, log: RunLog, data: dict
    ):
        self.run, self.mesh, self.batches, self.checkpoints, self.log = run, mesh, batches, checkpoints, log
        self.data_identity = data  # recorded in every checkpoint: a resume checks it
        self.ranking = is_ranking_run(run.train)
        if self.ranking:  # one device (checked by _fit before the data loaded)
            self.train_step = make_ranking_train_step(run.model, run.train)
            self.eval_step = make_ranking_eval_step(run.model, run.train)
        else:
            self.train_step = make_train_step(run.model, run.train, mesh)
            self.eval_step = make_eval_step(run.model, run.train)
        self.nonfinite = NonFinitePolicy(run.train, checkpoints, log.say)

    def steps(self, state: TrainState, validation) -> TrainState:
        """Train from state.step to max_steps; checkpoints every checkpoint_every steps, at the end
        and on SIGTERM / SIGINT (then raises Preempted); validation every eval_every steps."""
        tc = self.run.train
        pending = None  # (step, metrics on device, tokens): read one step late, the device busy meanwhile
        step = int(state.step)
        with Preemption() as preemption:
            while step < tc.max_steps:
                batch = next(self.batches)
                tokens = batch["input_ids"].size * jax.process_count()
                state, metrics = self.train_step(state, self.step_batch(batch))
                if pending is not None:
                    self.report(*pending)
                step += 1
                pending = (step, metrics, tokens)
                at_end = step == tc.max_steps
                if step % tc.checkpoint_every == 0 or at_end or preemption.received:
                    self.report(*pending)
                    pending = None
                    self.save(step, state)
                if validation is not None and (step % tc.eval_every == 0 or at_end):
                    if pending is not None:  # the step's line first, then its validation line
                        self.report(*pending)
                        pending = None
                    params = host_params(state.params, self.mesh)
                    self.log.eval(step, self.evaluate(params, validation, tc.eval_pairs))
                if preemption.received:
                    raise Preempted(
                        f"received signal {preemption.received}: saved checkpoint step {step} in "
                        f"{self.checkpoints.directory}; run the same command again to resume"
                    )
            if pending is not None:
                self.report(*pending)
        return state

    def step_batch(self, batch: dict) -> dict:
        """A data-layer batch in the steps' layout, on the mesh (jaxrm.sharding.shard_batch); ranking
        batches as they are (one device; the step lays them out on the host)."""
        tc = self.run.train
        if self.ranking:
            return batch
        return shd.shard_batch(batch, self.mesh, tc.batch_size, lengths=tc.lengths == "explicit")

    def report(self, step: int, metrics: dict, tokens: int) -> None:
        metrics = self.log.host_metrics(metrics, tokens)
        self.nonfinite.check(step, metrics)
        self.log.train(step, metrics)

    def save(self, step: int, state: TrainState) -> None:
        meta = {
            "config": self.run.to_dict(),
            "data": self.batches.state(),
            "data_identity": self.data_identity,
        }
        self.checkpoints.save(step, state, meta)

    def evaluate(self, params, data, limit: int = 0) -> dict:
        if self.ranking:
            return evaluate_rankings(self.eval_step, params, data, EVAL_BATCH_SIZE, limit)
        return evaluate(self.eval_step, params, data, EVAL_BATCH_SIZE, limit, self.run.train)


def _finish(
    loop: _Loop, state: TrainState, out: pathlib.Path, tokenizer, train_pairs: int, validation, started: float
) -> dict:
    """Export the weights and curves, evaluate (validation, and the bundled test split with the
    bundled data), write summary.json; the summary."""
    run, log = loop.run, loop.log
    params = host_params(state.params, loop.mesh)
    if log.primary:
        rundir.export_weights(out, merge_model(run.model, params))
        plot_curves(out / rundir.METRICS, out / rundir.CURVES)
    summary = {"steps": int(state.step), "train_pairs": train_pairs, "data": loop.data_identity}
    if validation is not None:
        summary["validation"] = loop.evaluate(params, validation)
        if log.primary:
            _write_normalization(loop, params, validation, out)
    if not run.train.data:
        test = load_data(run, tokenizer, str(bundled_data_path("test")))[0]
        summary["test"] = loop.evaluate(params, test)
    summary["wall_time_s"] = round(time.time() - started, 1)  # training and the final evaluation
    if log.primary:
        (out / rundir.SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    loop.checkpoints.close()
    log.close()
    return summary


def _write_normalization(loop: _Loop, params, validation, out: pathlib.Path) -> None:
    """normalization.json (for score / serve --normalize): the validation rewards' mean and std."""
    source = loop.run.train.eval_data or "bundled validation split"
    try:
        if loop.ranking:
            scored = ranking_outputs(loop.eval_step, params, validation, EVAL_BATCH_SIZE)
            norm = reward_normalization(scored["scores"][scored["valid"]], source)
        else:
            norm = validation_normalization(loop.eval_step, params, validation, EVAL_BATCH_SIZE, source)
    except ValueError as e:
        loop.log.say(f"no {NORMALIZATION} written: {e}")
        return
    write_normalization(out, norm)


def fit(
    run: RunConfig, out_dir, init_model: RewardModel | None = None, log=None, allow_data_change: bool = False
) -> dict:
    """Train `run` into `out_dir`, resuming from its latest checkpoint if there is one.

    Writes config.json, metrics.jsonl, checkpoints/, model.safetensors, curves.png and
    summary.json. Returns the summary (final validation and test metrics, wall time, and
    "new_steps": the steps this call trained). Refuses an `out_dir` that is a file or a non-empty
    directory jaxrm did not write, and one another run holds (RunLock; process 0 holds it for a
    multi-process run); resuming onto other data needs `allow_data_change`. A directory this call
    created is removed again when it fails before writing anything.
    """
    out = pathlib.Path(out_dir)
    created = rundir.check_out_dir(out)
    lock = RunLock(out) if jax.process_index() == 0 else None
    try:
        if lock is not None:
            lock.acquire()
        with Preemption() as preemption:  # a signal before the first step: stop before it, cleanly
            return _fit(run, out, init_model, log, allow_data_change, preemption)
    finally:
        if lock is not None:
            lock.release()
        if created and sys.exc_info()[0] is not None and jax.process_index() == 0:
            rundir.remove_if_unused(out)


def _stop_if_signalled(preemption: Preemption, where: str) -> None:
    if preemption.received:
        raise Preempted(
            f"received signal {preemption.received} {where}: no new checkpoint; run the same command "
            f"again to start (or resume from the latest checkpoint)"
        )


def _fit(run: RunConfig, out: pathlib.Path, init_model, log, allow_data_change: bool, preemption) -> dict:
    started = time.time()
    tc = run.train
    mesh = shd.make_mesh(tc.mesh_data, tc.mesh_fsdp)  # None: one device, the unsharded path
    shd.batch_size_per_shard(mesh, tc.batch_size, tc.grad_accum_steps)
    if is_ranking_run(tc):
        check_ranking_step(tc, mesh)
    out.mkdir(parents=True, exist_ok=True)
    run_log = RunLog(tc, log)
    if tc.deterministic:  # the CLI already set it before JAX started; a library caller is warned if too late
        applied = use_deterministic_ops()
        run_log.say(
            f"deterministic: XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}"
            + ("" if applied else " (set too late)")
        )
    if tc.warmup_steps >= tc.decay_steps:
        run_log.say(
            f"note: warmup_steps={tc.warmup_steps} >= the {tc.decay_steps} steps of the schedule: the "
            f"learning rate rises linearly for the whole run and never decays"
        )
    tokenizer, train_data, validation, identity = load_run_data(run, run_log.say)
    _stop_if_signalled(preemption, "while the data loaded")
    checkpoints = Checkpointer(out / rundir.CHECKPOINTS, keep=tc.keep_checkpoints)
    rows = shd.process_rows(mesh, tc.batch_size)  # this process's pairs of each global batch
    batches = BatchIterator(
        train_data,
        tc.batch_size,
        seed=tc.seed,
        group_by_length=tc.group_by_length,
        pad_multiple=tc.pad_multiple,
        rows=None if rows == (0, tc.batch_size) else rows,
    )
    state, resume_step = resume_or_init(
        run, out, checkpoints, batches, mesh, init_model, run_log, identity, allow_data_change
    )
    if mesh is not None:  # every process says which rows it loads
        run_log.say(
            f"mesh data={tc.mesh_data} x fsdp={tc.mesh_fsdp} over {jax.device_count()} devices, "
            f"{jax.process_count()} process(es); this process loads pairs "
            f"{rows[0]}..{rows[1] - 1} of each batch",
            every_process=True,
        )
    _stop_if_signalled(preemption, "before the first step")
    run_log.open(out / rundir.METRICS, resume_step)
    loop = _Loop(run, mesh, batches, checkpoints, run_log, identity)
    state = loop.steps(state, validation)
    summary = _finish(loop, state, out, tokenizer, len(train_data), validation, started)
    return {**summary, "new_steps": int(state.step) - (resume_step or 0)}
