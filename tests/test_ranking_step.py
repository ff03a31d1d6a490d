"""K-wise ranking steps (jaxrm/ranking_step.py): the prompt-once layouts give the rows layout's end
scores, loss and gradients; K = 2 is the pairs' Bradley-Terry loss (loss_type="last_token")."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxrm.config import TrainConfig
from jaxrm.layouts import ranking_batch, ranking_rows_shape
from jaxrm.loss import pairwise_loss
from jaxrm.model import RewardModel
from jaxrm.ranking import ranking_loss
from jaxrm.ranking_step import make_ranking_eval_step, make_ranking_train_step, ranking_scores
from jaxrm.sharding import shard_batch
from jaxrm.state import init_train_state
from jaxrm.step import make_train_step
from tests.conftest import MODEL

CFG = MODEL.replace(attention_block=8)
PAD = CFG.pad_id


def random_rankings(seed: int, sizes=(2, 3, 5, 4, 2, 3), T: int = 24, ties: bool = True) -> dict:
    """A data-layer ranking batch: a shared prompt (sometimes empty) then K answers per prompt,
    ranks 1..K with a tie in every third prompt."""
    rng = np.random.default_rng(seed)
    rows, lengths, ranks, offsets = [], [], [], [0]
    for i, k in enumerate(sizes):
        p = 0 if i % 4 == 3 else int(rng.integers(1, T // 2))
        prompt = rng.integers(0, 6, p)
        rank = np.arange(1, k + 1)
        if ties and i % 3 == 2:
            rank[-1] = rank[-2]
        for j in range(k):
            answer = rng.integers(0, 6, int(rng.integers(1, T - p)))
            answer[0] = j % 6  # responses differ from each other early on
            text = np.concatenate([prompt, answer])
            row = np.full(T, PAD, np.int32)
            row[: len(text)] = text
            rows.append(row)
            lengths.append(len(text))
            ranks.append(rank[j])
        offsets.append(offsets[-1] + k)
    return {
        "input_ids": np.stack(rows),  # (M, T)
        "lengths": np.asarray(lengths, np.int32),
        "ranks": np.asarray(ranks, np.int32),
        "offsets": np.asarray(offsets, np.int64),
    }


def result(model, batch, layout, loss_type):
    lb = ranking_batch(batch, layout, PAD, row_len=40)

    def loss(model):
        scores = ranking_scores(model, lb)
        return ranking_loss(scores, lb["ranks"], lb["valid"], loss_type).mean(), scores

    (value, scores), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    return value, np.where(lb["valid"], scores, 0), jax.tree.leaves(nnx.state(grads)), lb


@pytest.mark.parametrize("layout", ["shared", "packed"])
@pytest.mark.parametrize("loss_type", ["plackett_luce", "all_pairs"])
def test_layouts_match_rows(layout, loss_type):
    model = RewardModel(CFG, rngs=nnx.Rngs(1))
    batch = random_rankings(0)
    ref_loss, ref_scores, ref_grads, _ = result(model, batch, "rows", loss_type)
    value, scores, grads, lb = result(model, batch, layout, loss_type)
    assert lb["input_ids"].size < batch["input_ids"].size  # the prompt once: fewer tokens
    np.testing.assert_allclose(scores, ref_scores, atol=2e-6)
    np.testing.assert_allclose(value, ref_loss, rtol=1e-6)
    scale = max(float(np.abs(r).max()) for r in ref_grads)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, atol=1e-5 * float(np.abs(r).max()) + 1e-7 * scale)


def test_rows_scores_are_plain_end_scores():
    model = RewardModel(CFG, rngs=nnx.Rngs(1))
    batch = random_rankings(1)
    lb = ranking_batch(batch, "packed", PAD, row_len=40)
    rewards = np.asarray(nnx.jit(lambda m, ids: m(ids))(model, batch["input_ids"]))  # (M, T)
    expected = rewards[np.arange(len(batch["lengths"])), batch["lengths"] - 1]
    scores = np.asarray(nnx.jit(ranking_scores)(model, lb))[lb["valid"]]
    np.testing.assert_allclose(scores, expected, atol=2e-6)
    np.testing.assert_array_equal(lb["ranks"][lb["valid"]], batch["ranks"])


def as_pairs(batch: dict) -> dict:
    """K = 2 rankings (best first) as the pairs' rows batch: chosen rows, then rejected rows."""
    M, T = batch["input_ids"].shape
    return {
        "input_ids": batch["input_ids"].reshape(-1, 2, T).swapaxes(0, 1).reshape(M, T),  # (2B, T)
        "lengths": batch["lengths"].reshape(-1, 2).T.reshape(-1),  # (2B,)
        "margins": np.zeros(M // 2, np.float32),
    }


def test_k2_is_the_pairs_bradley_terry_loss():
    """Pairs as K = 2 rankings: both ranking losses give the loss and gradients of the pairs'
    loss_type="last_token" (Bradley-Terry on end scores)."""
    model = RewardModel(CFG, rngs=nnx.Rngs(1))
    batch = random_rankings(2, sizes=(2,) * 6, ties=False)
    pairs = as_pairs(batch)

    def pair_loss(model):
        return pairwise_loss(model(pairs["input_ids"]), pairs["input_ids"], PAD, loss_type="last_token").loss

    ref_loss, ref_grads = nnx.jit(nnx.value_and_grad(pair_loss))(model)
    ref_grads = jax.tree.leaves(nnx.state(ref_grads))
    scale = max(float(np.abs(r).max()) for r in ref_grads)
    for loss_type in ("plackett_luce", "all_pairs"):
        value, _, grads, _ = result(model, batch, "rows", loss_type)
        np.testing.assert_allclose(value, ref_loss, rtol=1e-6)
        for g, r in zip(grads, ref_grads, strict=True):
            np.testing.assert_allclose(g, r, atol=1e-5 * float(np.abs(r).max()) + 1e-7 * scale)


def test_k2_train_step_metrics_are_the_pairs_step_metrics():
    batch = random_rankings(2, sizes=(2,) * 6, ties=False)
    metrics = {}
    for loss_type in ("plackett_luce", "last_token"):
        tc = TrainConfig(loss_type=loss_type, batch_size=6, warmup_steps=1, max_steps=2)
        state = init_train_state(CFG, tc, seed=0)
        if loss_type == "last_token":
            step_batch = shard_batch(as_pairs(batch), None, 6, lengths=True)
            _, metrics[loss_type] = make_train_step(CFG, tc)(state, step_batch)
        else:
            _, metrics[loss_type] = make_ranking_train_step(CFG, tc)(state, batch)
    for key in ("loss", "accuracy", "grad_norm", "lr"):
        np.testing.assert_allclose(metrics["plackett_luce"][key], metrics["last_token"][key], rtol=2e-6)


@pytest.mark.parametrize("layout", ["rows", "packed"])
def test_train_and_eval_steps(layout):
    batch = random_rankings(3)
    tc = TrainConfig(loss_type="plackett_luce", layout=layout, batch_size=6, warmup_steps=1, max_steps=4)
    cfg = CFG.replace(embed_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, dropout=0.0)
    state = init_train_state(cfg, tc, seed=0)
    step, evaluate = make_ranking_train_step(cfg, tc), make_ranking_eval_step(cfg, tc)
    before = evaluate(state.params, {**batch, "valid": np.ones(6, bool)})
    losses = []
    for _ in range(4):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        assert bool(metrics["finite"])
        assert int(metrics["pairs"]) == 1 + 3 + 9 + 6 + 1 + 2  # ordered pairs (ties in prompts 2 and 5)
    after = evaluate(state.params, {**batch, "valid": np.ones(6, bool)})
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(before["loss"].mean(), losses[0], rtol=1e-5)
    assert after["loss"].mean() < before["loss"].mean()
    assert before["scores"].shape == (6, 8) and before["valid"].sum() == 19


def test_mesh_and_accumulation_are_refused():
    with pytest.raises(ValueError, match="one device with grad_accum_steps=1"):
        make_ranking_train_step(CFG, TrainConfig(loss_type="all_pairs", batch_size=4, grad_accum_steps=2))


def test_ranking_loss_refuses_pair_options():
    with pytest.raises(ValueError, match="takes no use_margins"):
        TrainConfig(loss_type="plackett_luce", use_margins=True)


def test_layout_runs_as_rows_when_not_cheaper():
    """The prompt-once rows are used when they cost less than one padded row per response
    (jaxrm.layout_cost), else the batch runs in rows: the same scores either way."""
    from jaxrm.ranking_step import _host_batch

    tc = TrainConfig(loss_type="plackett_luce", layout="packed", batch_size=2)
    cfg = CFG.replace(block_size=256)
    rng = np.random.default_rng(5)

    def two_prompts(prompt: int, answer: tuple) -> dict:  # 2 prompts x 4 responses, best first
        rows = []
        for _ in range(2):
            shared = rng.integers(0, 6, prompt)
            rows += [
                np.concatenate([shared, [j], rng.integers(0, 6, rng.integers(*answer))]) for j in range(4)
            ]
        ids = np.full((8, max(map(len, rows))), PAD, np.int32)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
        ranks = np.tile(np.arange(1, 5, dtype=np.int32), 2)
        return {
            "input_ids": ids,
            "lengths": np.array(list(map(len, rows)), np.int32),
            "ranks": ranks,
            "offsets": np.array([0, 4, 8]),
        }

    long_prompt, no_prompt = two_prompts(150, (5, 20)), two_prompts(0, (150, 200))
    for batch in (long_prompt, no_prompt):  # the cost rule's rows shape is the rows batch's
        rows = ranking_batch(batch, "rows", PAD, row_len=0)["input_ids"]
        assert ranking_rows_shape(batch["lengths"]) == rows.shape
    assert "positions" in _host_batch(long_prompt, tc, cfg, sdpa=False)
    assert "positions" not in _host_batch(no_prompt, tc, cfg, sdpa=False)
    metrics = make_ranking_train_step(cfg, tc)(init_train_state(cfg, tc, seed=0), no_prompt)[1]
    assert metrics["rows_fallback"] == 1.0
