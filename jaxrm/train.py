"""Training: a pure, jitted train_step over a donated TrainState, an eval step, and the fit loop."""
from __future__ import annotations

import json
import math
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
    return graphdef, params.to_pure_dict()


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


def _loss_options(tc: TrainConfig, margins):
    return dict(loss_type=tc.loss_type, margins=margins if tc.use_margins else None,
                center_rewards_coef=tc.center_rewards_coef, normalize_by=tc.normalize_by)


def _micro_batches(batch: dict, k: int) -> dict:
    """(2B, T) chosen-then-rejected -> (k, 2B/k, T), each micro-batch keeping its pairs whole."""
    ids, margins = batch["input_ids"], batch["margins"]
    B, T = ids.shape[0] // 2, ids.shape[1]
    chosen = ids[:B].reshape(k, B // k, T)       # (k, B/k, T)
    rejected = ids[B:].reshape(k, B // k, T)     # (k, B/k, T)
    return {"input_ids": jnp.concatenate([chosen, rejected], axis=1),  # (k, 2B/k, T)
            "margins": margins.reshape(k, B // k)}                     # (k, B/k)


def pair_metrics(out, valid=None) -> dict:
    """Batch statistics over the pairs that count (non-identical, and valid when given)."""
    counted = ~out.identical if valid is None else (~out.identical & valid)
    n = jnp.maximum(counted.sum(), 1)
    mean = lambda x: jnp.where(counted, x, 0.0).sum() / n
    std = lambda x: jnp.sqrt(mean((x - mean(x)) ** 2))
    c, r = out.chosen_end_scores, out.rejected_end_scores
    return {"accuracy": mean((c > r).astype(jnp.float32)), "margin": mean(c - r),
            "chosen_mean": mean(c), "chosen_std": std(c), "rejected_mean": mean(r), "rejected_std": std(r)}


def make_train_step(model_config: ModelConfig, train_config: TrainConfig):
    """jit(train_step)(state, batch) -> (state, metrics), the state donated.

    batch: {"input_ids": (2B, T) int32 chosen rows then rejected rows, "margins": (B,) float32}.
    With grad_accum_steps = k the batch is cut into k micro-batches of whole pairs and the
    gradient is the exact full-batch gradient: every micro-batch's loss sum is divided by the
    full batch's denominator. A step whose loss or gradient norm is not finite leaves params and
    optimizer state untouched and reports finite=False.
    """
    tc, pad_id, k = train_config, model_config.pad_id, train_config.grad_accum_steps
    graphdef = model_graphdef(model_config)
    dropout = _has_dropout(model_config)

    def objective(params, micro, key, denominator, num_counted):
        model = nnx.merge(graphdef, params)
        rewards = model(micro["input_ids"], deterministic=not dropout, rngs=nnx.Rngs(dropout=key))
        out = pairwise_loss(rewards, micro["input_ids"], pad_id, **_loss_options(tc, micro["margins"]))
        value = out.per_pair_loss.sum() / denominator
        if tc.center_rewards_coef:
            value = value + tc.center_rewards_coef * out.centered.sum() / num_counted
        return value, out

    def train_step(state: TrainState, batch: dict):
        ids = batch["input_ids"]
        B = ids.shape[0] // 2
        num_counted = jnp.maximum((~identical_pairs(ids, pad_id)).sum(), 1).astype(jnp.float32)
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
        grad_norm = optax.global_norm(grads)
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

    return jax.jit(train_step, donate_argnums=0)


def make_eval_step(model_config: ModelConfig, train_config: TrainConfig):
    """jit(eval_step)(params, batch) -> per-pair end scores, loss terms and identical flags."""
    graphdef = model_graphdef(model_config)

    def eval_step(params, batch):
        model = nnx.merge(graphdef, params)
        rewards = model(batch["input_ids"], deterministic=True)
        out = pairwise_loss(rewards, batch["input_ids"], model_config.pad_id,
                            **_loss_options(train_config, batch["margins"]))
        return {"chosen": out.chosen_end_scores, "rejected": out.rejected_end_scores,
                "identical": out.identical, "loss": out.per_pair_loss}

    return jax.jit(eval_step)


def evaluate(eval_step, params, data, batch_size: int, limit: int = 0) -> dict:
    """Accuracy, loss, margin and reward statistics over `data` (the first `limit` pairs if > 0)."""
    from jaxrm.data import eval_batches
    chosen, rejected, identical, losses = [], [], [], []
    seen = 0
    for batch in eval_batches(data, batch_size):
        out = jax.device_get(eval_step(params, {"input_ids": batch["input_ids"], "margins": batch["margins"]}))
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
