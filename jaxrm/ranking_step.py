"""The compiled steps for K-wise rankings (TrainConfig.loss_type "plackett_luce" / "all_pairs"):
train_step(state, batch) -> (state, metrics) and eval_step(params, batch) -> per-prompt arrays.

The data layer's ranking batch (jaxrm.ranking_data), N prompts with M responses in all:
    input_ids (M, T) int32   prompt + response, right-padded; a prompt's responses consecutive
    lengths   (M,) int32     real tokens per row
    ranks     (M,) int32     1 = best within its prompt; equal ranks are ties
    offsets   (N + 1,)       prompt i's rows are offsets[i]:offsets[i + 1]
    valid     (N,) bool      eval only: False for filler prompts
On the host the steps turn it into TrainConfig.layout's rows (jaxrm.layouts.ranking_batch: one
padded row per response for "rows", the prompt once for "shared" / "packed", unless those rows
would cost no less than the padded ones: jaxrm.layout_cost); the model runs on
those, each response's end score (the reward at its last token, as for pairs) is gathered, and
the loss is jaxrm.ranking.ranking_loss, averaged over prompts. With K = 2 both losses are the
Bradley-Terry loss of the pair, i.e. loss_type="last_token" on pairs. One device, one micro-batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrm.config import ModelConfig, TrainConfig
from jaxrm.layout_cost import layout_is_cheaper
from jaxrm.layouts import ranking_batch, ranking_rows_shape
from jaxrm.ranking import better_pairs, ranking_loss
from jaxrm.state import TrainState, model_graphdef
from jaxrm.step import finish_update, jit_step, rows_rewards, runs_sdpa_by_default


def ranking_scores(model, batch: dict, deterministic: bool = True, key=None, plan=None):
    """(N, K) end scores of a layout ranking batch: the model on its rows (R, L), each response's
    reward read at its last token (0 in slots that are not valid)."""
    rewards = rows_rewards(model, batch, deterministic, key, plan)  # (R, L)
    scores = jnp.take(rewards.reshape(-1), batch["ends"], axis=0)  # (N, K)
    return jnp.where(batch["valid"], scores, 0.0)


def ranking_accuracy(scores, ranks, valid):
    """(correct ordered pairs, ordered pairs) over the batch: pairs j, l of a prompt with
    rank_j < rank_l; correct when score_j > score_l (a tie in score is wrong)."""
    better = better_pairs(ranks, valid)  # (N, K, K)
    correct = better & (scores[:, :, None] > scores[:, None, :])
    return correct.sum(), better.sum()


def _prompt_mean(x, prompt_valid):
    return jnp.where(prompt_valid, x, 0.0).sum() / jnp.maximum(prompt_valid.sum(), 1)


def _host_batch(batch: dict, tc: TrainConfig, model_config: ModelConfig, sdpa: bool) -> dict:
    """The data layer's ranking batch in tc.layout (packed rows of the padded length T), or in rows
    when the layout's rows would cost no less (jaxrm.layout_cost; the same scores either way)."""
    batch = jax.device_get(batch)
    if tc.layout != "rows":
        layout = ranking_batch(batch, tc.layout, model_config.pad_id, row_len=batch["input_ids"].shape[-1])
        rows_shape = ranking_rows_shape(batch["lengths"])
        if layout_is_cheaper(rows_shape, layout["input_ids"].shape, model_config, sdpa):
            return layout
    return ranking_batch(batch, "rows", model_config.pad_id, row_len=0)


def check_ranking_step(tc: TrainConfig, mesh) -> None:
    if mesh is not None or tc.grad_accum_steps != 1:
        raise ValueError(
            f"loss_type={tc.loss_type!r} (rankings) runs on one device with grad_accum_steps=1 (got a "
            f"mesh: {mesh is not None}, grad_accum_steps={tc.grad_accum_steps})"
        )


def make_ranking_train_step(model_config: ModelConfig, tc: TrainConfig, mesh=None):
    """train_step(state, batch) -> (state, metrics) on ranking batches (module docstring).
    metrics: loss (mean over prompts), accuracy (over ordered pairs), pairs, grad_norm, lr, finite."""
    check_ranking_step(tc, mesh)
    graphdef = model_graphdef(model_config)

    def objective(params, batch, key):
        model = nnx.merge(graphdef, params)
        scores = ranking_scores(model, batch, not model_config.has_dropout, key)
        per_prompt = ranking_loss(scores, batch["ranks"], batch["valid"], tc.loss_type)  # (N,)
        return _prompt_mean(per_prompt, batch["prompt_valid"]), scores

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def train_step(state: TrainState, batch: dict):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        (loss, scores), grads = grad_fn(state.params, batch, key)
        correct, pairs = ranking_accuracy(scores, batch["ranks"], batch["valid"])
        stats = {"loss": loss, "accuracy": correct / jnp.maximum(pairs, 1), "pairs": pairs}
        return finish_update(state, loss, grads, tc, stats)

    step = jit_step(train_step, tc)
    sdpa = runs_sdpa_by_default(model_config, model_config.has_dropout)

    def layout_or_rows_step(state: TrainState, batch: dict):
        rows = _host_batch(batch, tc, model_config, sdpa)
        state, metrics = step(state, rows)
        fallback = tc.layout != "rows" and "positions" not in rows  # as jaxrm.step's rows_fallback
        return state, {**metrics, "rows_fallback": float(fallback)} if tc.layout != "rows" else metrics

    return layout_or_rows_step


def make_ranking_eval_step(model_config: ModelConfig, tc: TrainConfig):
    """eval_step(params, batch) -> {"scores" (N, K), "ranks" (N, K), "valid" (N, K), "loss" (N,),
    "prompt_valid" (N,)} as numpy, for jaxrm.evaluate.evaluate_rankings; no dropout."""
    graphdef = model_graphdef(model_config)

    def eval_step(params, batch):
        scores = ranking_scores(nnx.merge(graphdef, params), batch)
        loss = ranking_loss(scores, batch["ranks"], batch["valid"], tc.loss_type)
        return {"scores": scores, "loss": loss}

    step = jax.jit(eval_step)

    sdpa = runs_sdpa_by_default(model_config, dropout=False)

    def run(params, batch):
        rows = _host_batch(batch, tc, model_config, sdpa)
        out = jax.device_get(step(params, rows))
        keep = {name: rows[name] for name in ("ranks", "valid", "prompt_valid")}
        return {**{k: np.asarray(v) for k, v in out.items()}, **keep}

    return run
