"""The compiled steps: train_step(state, batch) -> (state, metrics), eval_step(params, batch).

One batch layout for both steps, on one device and on a mesh, as jaxrm.sharding.shard_batch
makes it from the data layer's batches:
    input_ids  (2, B, T) int32: [0] the chosen rows, [1] the rejected rows of the same B pairs
    margins    (B,) float32
    lengths    (2, B) int32, each row's number of real tokens (read with TrainConfig.lengths="explicit")
Inside, the model and the loss see the original's rows: (2B, T), chosen rows then rejected rows.

With TrainConfig.layout "shared" or "packed" the steps take the same batches and, on the host,
turn them into that layout's rows (jaxrm.layouts: each prompt once, position, segment and branch
ids, and where each padded row's rewards are read); the model runs on those rows, the rewards are
gathered back to the padded rows' positions, and the loss is the same function of them
(jaxrm.loss.pairwise_loss_at). A batch whose layout rows would cost no less than its padded rows
(jaxrm.layout_cost: long answers after short prompts) runs in rows instead. One device, one
micro-batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import checkify
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrm import sharding as shd
from jaxrm.config import ModelConfig, TrainConfig
from jaxrm.kernels import runs_sdpa
from jaxrm.layout_cost import layout_is_cheaper
from jaxrm.layouts import to_layout
from jaxrm.loss import identical_pairs, loss_denominators, pairwise_loss, pairwise_loss_at, reduce_loss
from jaxrm.metrics import pair_metrics
from jaxrm.optim import learning_rate, make_optimizer
from jaxrm.plan import execution_plan
from jaxrm.state import TrainState, abstract_train_state, model_graphdef


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite step, a fault found by debug checks, another run's
    checkpoint); the message says where and what to do."""


# -----------------------------------------------------------------------------
# the batch: the steps' layout -> the loss's rows


def pair_rows(batch: dict) -> dict:
    """input_ids (2, B, T) -> (2B, T) chosen rows then rejected rows; lengths (2, B) -> (2B,);
    margins (B,) unchanged."""
    ids = batch["input_ids"]
    rows = {"input_ids": ids.reshape(-1, ids.shape[-1]), "margins": batch["margins"]}  # (2B, T)
    if batch.get("lengths") is not None:
        rows["lengths"] = batch["lengths"].reshape(-1)  # (2B,)
    return rows


def micro_batches(batch: dict, k: int) -> dict:
    """k micro-batches of whole pairs, each in the loss's rows: input_ids (k, 2B/k, T), micro-batch
    i holding the i-th B/k chosen rows then their rejected rows; lengths (k, 2B/k); margins (k, B/k)."""
    rows = pair_rows(batch)
    B = rows["input_ids"].shape[0] // 2

    def split(x):  # (2B, ...) -> (k, 2B/k, ...)
        chosen = x[:B].reshape(k, B // k, *x.shape[1:])  # (k, B/k, ...)
        rejected = x[B:].reshape(k, B // k, *x.shape[1:])  # (k, B/k, ...)
        return jnp.concatenate([chosen, rejected], axis=1)

    micro = {"input_ids": split(rows["input_ids"]), "margins": rows["margins"].reshape(k, B // k)}  # (k, B/k)
    if "lengths" in rows:
        micro["lengths"] = split(rows["lengths"])
    return micro


def _check_layout(batch: dict, tc: TrainConfig) -> None:
    """Trace-time checks that the batch has the steps' layout (module docstring)."""
    shape = batch["input_ids"].shape
    if len(shape) != 3 or shape[0] != 2:
        raise ValueError(
            f"a step takes input_ids (2, B, T): the chosen and the rejected rows of B pairs "
            f"(jaxrm.sharding.shard_batch makes them from a (2B, T) batch); got {shape}"
        )
    if tc.lengths == "explicit" and batch.get("lengths") is None:
        raise ValueError('lengths="explicit" needs batches with "lengths" ((2, B) int32, each row\'s length)')


def _loss_options(tc: TrainConfig, rows: dict) -> dict:
    return dict(
        loss_type=tc.loss_type,
        margins=rows["margins"] if tc.use_margins else None,
        center_rewards_coef=tc.center_rewards_coef,
        normalize_by=tc.normalize_by,
        lengths=rows.get("lengths") if tc.lengths == "explicit" else None,
    )


# -----------------------------------------------------------------------------
# the train step


def _apply_interleaved(model, ids, key, dropout: bool, pairs_sharding, devices):
    """Rewards (2b, T), chosen rows then rejected, of rows `ids` (2b, T) in that order. The model
    runs on the pairs interleaved (chosen_0, rejected_0, chosen_1, ...), on one device too, so that
    a mesh splitting the batch by pair draws the same dropout masks (hashed from element indices)."""
    n, T = ids.shape
    pairs = ids.reshape(2, n // 2, T).swapaxes(0, 1).reshape(n, T)  # (2, b, T) -> (b, 2, T) -> (2b, T)
    if pairs_sharding is not None:
        pairs = jax.lax.with_sharding_constraint(pairs, pairs_sharding)
    plan = execution_plan(model.config, n, T, devices)  # for the devices the step runs on
    rewards = model(pairs, deterministic=not dropout, rngs=nnx.Rngs(dropout=key), plan=plan)
    return rewards.reshape(n // 2, 2, T).swapaxes(0, 1).reshape(n, T)  # (b, 2, T) -> (2, b, T) -> (2b, T)


def _make_objective(model_config: ModelConfig, tc: TrainConfig, mesh):
    """objective(params, rows, key, denominators) -> (loss, PairwiseOutput) of one micro-batch
    (rows: the loss's layout); its loss is its share of the whole batch's, normalized with the
    whole batch's denominators (jaxrm.loss.loss_denominators)."""
    graphdef = model_graphdef(model_config)
    pairs_sharding = None if mesh is None else NamedSharding(mesh, P(shd.BATCH_AXES))
    devices = jax.devices() if mesh is None else list(mesh.devices.flat)

    def objective(params, rows, key, denominators):
        model = nnx.merge(graphdef, params)
        rewards = _apply_interleaved(
            model, rows["input_ids"], key, model_config.has_dropout, pairs_sharding, devices
        )
        out = pairwise_loss(rewards, rows["input_ids"], model_config.pad_id, **_loss_options(tc, rows))
        return reduce_loss(out.per_pair_loss, out.centered, *denominators, tc.center_rewards_coef), out

    return objective


def _gradients(grad_fn, params, batch: dict, key, denominators, k: int):
    """(loss, per-pair outputs, gradient) of the whole batch. With k > 1 the sum over k micro-batches
    (lax.scan; micro-batch i draws dropout with fold_in(key, i)), exact: every micro-batch's terms
    are divided by the whole batch's denominators."""
    if k == 1:
        (loss, out), grads = grad_fn(params, pair_rows(batch), key, denominators)
        return loss, out, grads

    def add(grads, xs):
        micro, i = xs
        (value, out), g = grad_fn(params, micro, jax.random.fold_in(key, i), denominators)
        return jax.tree.map(jnp.add, grads, g), (value, out)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, (values, outs) = jax.lax.scan(add, zeros, (micro_batches(batch, k), jnp.arange(k)))
    # per-pair fields (k, B/k) -> (B,) in pair order; the scalar fields (summed) are not read
    out = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]) if x.ndim > 1 else x.sum(), outs)
    return values.sum(), out, grads


def _update_if_finite(state: TrainState, grads, loss, tc: TrainConfig):
    """(new state, gradient norm, finite): AdamW's update of params and optimizer state, kept only
    when the loss and the gradient norm are finite; the step count advances either way."""
    grad_norm = optax.tree.norm(grads)
    optimizer = make_optimizer(tc, state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        rng=state.rng,
    )
    return new_state, grad_norm, finite


def finish_update(state: TrainState, loss, grads, tc: TrainConfig, stats: dict):
    """(new state, metrics) of a step from its loss, gradient and batch statistics: the AdamW
    update (kept only when finite), and metrics = stats + loss, grad_norm, lr, finite."""
    new_state, grad_norm, finite = _update_if_finite(state, grads, loss, tc)
    lr = learning_rate(
        state.step,
        peak=tc.learning_rate,
        min_lr=tc.min_lr,
        warmup_steps=tc.warmup_steps,
        decay_steps=tc.decay_steps,
    )
    return new_state, {**stats, "loss": loss, "grad_norm": grad_norm, "lr": lr, "finite": finite}


def _finish_step(state: TrainState, loss, out, grads, tc: TrainConfig):
    """finish_update with the pair statistics of the step's per-pair outputs."""
    stats = pair_metrics(out.chosen_end_scores, out.rejected_end_scores, out.identical, loss)
    return finish_update(state, loss, grads, tc, stats)


def make_train_step(model_config: ModelConfig, train_config: TrainConfig, mesh=None):
    """jit(train_step)(state, batch) -> (state, metrics), the state donated; batch in the steps'
    layout (module docstring). metrics: loss, grad_norm, lr, finite and jaxrm.metrics.pair_metrics.

    With grad_accum_steps = k the batch is cut into k micro-batches of whole pairs and the
    gradient is the exact full-batch gradient. A step whose loss or gradient norm is not finite
    leaves params and optimizer state untouched and reports finite=False.

    With a `mesh` (jaxrm.sharding.make_mesh) the state must be placed with
    jaxrm.sharding.shard_state and the batch with jaxrm.sharding.shard_batch (sharded on the pair
    axis, so each device holds whole pairs). Dropout masks are a function of each element's index
    in the interleaved pairs, so a sharded run computes the same function as one device.
    """
    tc, k = train_config, train_config.grad_accum_steps
    if tc.layout != "rows":
        return _layout_train_step(model_config, tc, mesh)
    if mesh is not None:
        shd.batch_size_per_shard(mesh, tc.batch_size, k)
    grad_fn = jax.value_and_grad(_make_objective(model_config, tc, mesh), has_aux=True)

    def train_step(state: TrainState, batch: dict):
        _check_layout(batch, tc)
        rows = pair_rows(batch)
        lengths = _loss_options(tc, rows)["lengths"]
        identical = identical_pairs(rows["input_ids"], model_config.pad_id, lengths)
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        loss, out, grads = _gradients(
            grad_fn, state.params, batch, key, loss_denominators(identical, tc.normalize_by), k
        )
        return _finish_step(state, loss, out, grads, tc)

    if mesh is None:
        return jit_step(train_step, tc)
    state_shardings = shd.state_shardings(abstract_train_state(model_config, tc), mesh)
    batch_shardings = shd.batch_shardings(mesh, lengths=tc.lengths == "explicit")
    return jit_step(
        train_step,
        tc,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, NamedSharding(mesh, P())),
    )


# -----------------------------------------------------------------------------
# the shared and packed layouts (jaxrm.layouts)


LAYOUT_IDS = ("positions", "segment_ids", "branch_ids")


def rows_rewards(model, batch: dict, deterministic: bool = True, key=None, plan=None):
    """Rewards (R, L) of a layout batch's token rows: input_ids (R, L) and, when the batch has
    them, its position, segment and branch ids (else plain causal rows)."""
    R, L = batch["input_ids"].shape
    return model(
        batch["input_ids"],
        deterministic=deterministic,
        rngs=nnx.Rngs(dropout=key) if key is not None else None,
        plan=plan or execution_plan(model.config, R, L, jax.devices()),
        **{name: batch[name] for name in LAYOUT_IDS if name in batch},
    )


def layout_rewards(model, batch: dict, deterministic: bool = True, key=None, plan=None):
    """Rewards (2B, Tv) at the padded rows' positions, chosen rows then rejected, of a layout
    batch: the model on its rows (R, L), then each read position gathered (0 where not carried:
    never read by the loss)."""
    rewards = rows_rewards(model, batch, deterministic, key, plan)  # (R, L)
    read = batch["read"]  # (2, B, Tv)
    gathered = jnp.take(rewards.reshape(-1), jnp.maximum(read, 0), axis=0)  # (2, B, Tv)
    return jnp.where(read >= 0, gathered, 0.0).reshape(-1, read.shape[-1])  # (2B, Tv)


def layout_loss(rewards, batch: dict, tc: TrainConfig, return_loss: bool = True):
    """jaxrm.loss.pairwise_loss_at on layout_rewards' rows, with the layout batch's geometry."""
    return pairwise_loss_at(
        rewards,
        batch["ends"].reshape(-1),  # (2B,)
        batch["div"],
        batch["identical"],
        return_loss,
        loss_type=tc.loss_type,
        margins=batch["margins"] if tc.use_margins else None,
        center_rewards_coef=tc.center_rewards_coef,
        normalize_by=tc.normalize_by,
    )


def _check_layout_step(tc: TrainConfig, mesh) -> None:
    if mesh is not None or tc.grad_accum_steps != 1:
        raise ValueError(
            f"layout={tc.layout!r} runs on one device with grad_accum_steps=1 (got a mesh: "
            f"{mesh is not None}, grad_accum_steps={tc.grad_accum_steps}); use layout=rows for those"
        )


def _host_layout(batch: dict, tc: TrainConfig, model_config: ModelConfig, sdpa: bool) -> dict | None:
    """A steps'-layout batch (module docstring) in tc.layout, on the host (jaxrm.layouts.to_layout);
    None when that layout's rows would cost no less than the padded rows (jaxrm.layout_cost; `sdpa`:
    the attention runs jax.nn.dot_product_attention)."""
    batch = jax.device_get(batch)
    _, B, T = batch["input_ids"].shape
    row_len = T  # packed rows of the padded length: never longer
    layout = to_layout(batch, tc.layout, model_config.pad_id, tc.lengths == "explicit", row_len)
    cheaper = layout_is_cheaper((2 * B, T), layout["input_ids"].shape, model_config, sdpa)
    return layout if cheaper else None


def runs_sdpa_by_default(model_config: ModelConfig, dropout: bool) -> bool:
    """Whether a step's attention is jax.nn.dot_product_attention on the default devices."""
    return runs_sdpa(execution_plan(model_config, 1, 1), model_config, dropout)


def _layout_train_step(model_config: ModelConfig, tc: TrainConfig, mesh):
    """make_train_step for tc.layout "shared" / "packed": same state, batches and metrics, and
    metrics["rows_fallback"]: 1.0 when the batch ran in rows because its layout would not have been
    cheaper (_host_layout; the loss and gradients are the same, the dropout masks the rows' ones)."""
    _check_layout_step(tc, mesh)
    graphdef = model_graphdef(model_config)

    def objective(params, batch, key, denominators):
        model = nnx.merge(graphdef, params)
        rewards = layout_rewards(model, batch, not model_config.has_dropout, key)
        out = layout_loss(rewards, batch, tc, return_loss=False)
        return reduce_loss(out.per_pair_loss, out.centered, *denominators, tc.center_rewards_coef), out

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def train_step(state: TrainState, batch: dict):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        denominators = loss_denominators(batch["identical"], tc.normalize_by)
        (loss, out), grads = grad_fn(state.params, batch, key, denominators)
        return _finish_step(state, loss, out, grads, tc)

    step = jit_step(train_step, tc)
    rows_step = make_train_step(model_config, dataclasses.replace(tc, layout="rows"))
    sdpa = runs_sdpa_by_default(model_config, model_config.has_dropout)

    def layout_or_rows_step(state: TrainState, batch: dict):
        layout = _host_layout(batch, tc, model_config, sdpa)
        state, metrics = rows_step(state, batch) if layout is None else step(state, layout)
        return state, {**metrics, "rows_fallback": float(layout is None)}

    return layout_or_rows_step


def _layout_eval_step(model_config: ModelConfig, tc: TrainConfig):
    """make_eval_step for tc.layout "shared" / "packed"."""
    graphdef = model_graphdef(model_config)

    def eval_step(params, batch):
        out = layout_loss(layout_rewards(nnx.merge(graphdef, params), batch), batch, tc, return_loss=False)
        return _eval_outputs(out)

    step = jax.jit(eval_step)
    rows_step = make_eval_step(model_config, dataclasses.replace(tc, layout="rows"))
    sdpa = runs_sdpa_by_default(model_config, dropout=False)

    def layout_or_rows_step(params, batch: dict):
        layout = _host_layout(batch, tc, model_config, sdpa)
        return rows_step(params, batch) if layout is None else step(params, layout)

    return layout_or_rows_step


# -----------------------------------------------------------------------------
# compiling it, with TrainConfig.debug_checks


def jit_step(train_step, tc: TrainConfig, **shardings):
    """jit(train_step) with the state donated; with tc.debug_checks, a host-side wrapper around it
    that raises TrainingError naming the step and the fault (one device sync per step: debugging only).

    checkify: the step runs under jax.experimental.checkify with index (out-of-range gathers, e.g. a
    token id >= vocab_size, which the model otherwise turns into NaN), NaN, division and user checks.
    nans: the step runs with jax_debug_nans (no donation: on a NaN JAX re-runs the step op by op).
    """
    if tc.debug_checks == "off":
        return jax.jit(train_step, donate_argnums=0, **shardings)
    if tc.debug_checks == "nans":
        return _debug_nans_step(jax.jit(train_step, **shardings))
    return _checkified_step(train_step, shardings)


def _debug_nans_step(step):
    def debug_nans_step(state, batch):
        number = int(np.asarray(state.step.addressable_shards[0].data)) + 1
        try:
            with jax.debug_nans(True):
                return step(state, batch)
        except (FloatingPointError, ValueError) as e:  # ValueError: the op-by-op re-run's input checks
            raise TrainingError(f"debug_checks=nans: step {number}: {type(e).__name__}: {e}") from None

    return debug_nans_step


def _checkified_step(train_step, shardings: dict):
    errors = checkify.index_checks | checkify.nan_checks | checkify.div_checks | checkify.user_checks
    if "out_shardings" in shardings:  # the error value is replicated, like the metrics
        out = shardings["out_shardings"]
        shardings = {**shardings, "out_shardings": (out[1], out)}
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


# -----------------------------------------------------------------------------
# the eval step


def make_eval_step(model_config: ModelConfig, train_config: TrainConfig):
    """jit(eval_step)(params, batch) -> per-pair (B,) arrays: "chosen" and "rejected" end scores,
    "identical" flags, "loss" terms and "centered" terms (jaxrm.evaluate reduces them); batch in
    the steps' layout (module docstring); no dropout."""
    if train_config.layout != "rows":
        return _layout_eval_step(model_config, train_config)
    graphdef = model_graphdef(model_config)

    def eval_step(params, batch):
        _check_layout(batch, train_config)
        rows = pair_rows(batch)
        rewards = nnx.merge(graphdef, params)(rows["input_ids"], deterministic=True)
        out = pairwise_loss(
            rewards, rows["input_ids"], model_config.pad_id, **_loss_options(train_config, rows)
        )
        return _eval_outputs(out)

    return jax.jit(eval_step)


def _eval_outputs(out) -> dict:
    return {
        "chosen": out.chosen_end_scores,
        "rejected": out.rejected_end_scores,
        "identical": out.identical,
        "loss": out.per_pair_loss,
        "centered": out.centered,
    }
