"""TrainConfig.layout: shared (prompt once per pair) and packed (several pairs per row) compute the
same rewards where the loss reads them, end scores, loss and gradients as rows (jaxrm/layouts.py).

Bounds (float32, tiny model): rewards and end scores within 2e-6 absolute, loss within 1e-6
relative, gradients within 1e-5 of the largest entry of each tensor plus 1e-7 of the largest gradient
entry overall (for tensors whose gradient is all rounding noise, e.g. ~1e-10; the rows and the
layout's rows run the same math in different shapes, so XLA may sum in another order).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrm import cli
from jaxrm.config import TrainConfig
from jaxrm.layout_cost import attention_area, layout_is_cheaper
from jaxrm.layouts import layout_savings, pack, packed_batch, shared_batch, to_layout
from jaxrm.loss import pairwise_loss
from jaxrm.model import RewardModel
from jaxrm.sharding import shard_batch
from jaxrm.state import init_train_state
from jaxrm.step import layout_loss, layout_rewards, make_eval_step, make_train_step
from tests.conftest import MODEL, make_run

CFG = MODEL.replace(attention_block=8)  # several attention blocks at T <= 24
PAD = CFG.pad_id
CASES = ("random", "identical", "div0", "ends_before", "prompt_only_diff_last")


def random_pairs(seed: int, B: int = 10, T: int = 24, explicit: bool = False) -> dict:
    """A rows batch (input_ids (2B, T), lengths (2B,), margins (B,)) cycling through CASES; with
    `explicit` the texts may hold the PAD id and the padding is garbage."""
    rng = np.random.default_rng(seed)
    vocab = 6  # few ids: accidental agreements after the divergence
    ids = np.full((2, B, T), PAD, np.int32)
    lengths = np.zeros((2, B), np.int32)
    for i in range(B):
        case = CASES[i % len(CASES)]
        p = 0 if case == "div0" else int(rng.integers(1, T // 2))
        prompt = rng.integers(0, vocab, p)
        a = rng.integers(0, vocab, int(rng.integers(1, T - p)))
        b = rng.integers(0, vocab, int(rng.integers(1, T - p)))
        if case == "identical":
            b = a.copy()
        elif case == "div0":
            b[0] = (a[0] + 1) % vocab
        elif case == "ends_before":
            a = a[:0] if p else a[:1]
            b = np.concatenate([a, rng.integers(0, vocab, int(rng.integers(1, T - p - len(a))))])
        elif case == "prompt_only_diff_last":
            b = a.copy()
            b[-1] = (a[-1] + 1) % vocab
        for side, answer in enumerate((a, b)):
            text = np.concatenate([prompt, answer]).astype(np.int32)
            if explicit:
                text = np.where(rng.random(len(text)) < 0.1, PAD, text)
                ids[side, i] = rng.integers(0, vocab, T)  # garbage after the end
            ids[side, i, : len(text)] = text
            lengths[side, i] = len(text)
    margins = rng.normal(size=B).astype(np.float32)
    return {"input_ids": ids.reshape(2 * B, T), "lengths": lengths.reshape(-1), "margins": margins}


def rows_reference(model, batch, tc: TrainConfig):
    """(rewards (2B, T), PairwiseOutput) of the rows layout."""
    explicit = tc.lengths == "explicit"

    def loss(model):
        rewards = model(jnp.asarray(batch["input_ids"]))
        out = pairwise_loss(
            rewards,
            batch["input_ids"],
            PAD,
            loss_type=tc.loss_type,
            margins=batch["margins"] if tc.use_margins else None,
            lengths=batch["lengths"] if explicit else None,
        )
        return out.loss, (rewards, out)

    (_, aux), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    return aux, grads


def layout_result(model, lb, tc: TrainConfig):
    def loss(model):
        rewards = layout_rewards(model, {k: jnp.asarray(v) for k, v in lb.items()})
        out = layout_loss(rewards, lb, tc)
        return out.loss, (rewards, out)

    (_, aux), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    return aux, grads


def assert_same_as_rows(model, batch, lb, tc):
    (ref_rewards, ref), ref_grads = rows_reference(model, batch, tc)
    (rewards, out), grads = layout_result(model, lb, tc)
    read = lb["read"].reshape(rewards.shape) >= 0  # (2B, Tv)
    Tv = read.shape[1]
    ends = lb["ends"].reshape(-1)
    # every position the loss reads is carried: the span and the end scores
    for i in range(len(ends) // 2):
        if not lb["identical"][i]:
            assert read[i, lb["div"][i] : ends.reshape(2, -1)[:, i].max()].all()
    assert read[np.arange(len(ends)), ends - 1].all()
    np.testing.assert_allclose(np.where(read, rewards, 0), np.where(read, ref_rewards[:, :Tv], 0), atol=2e-6)
    np.testing.assert_allclose(out.chosen_end_scores, ref.chosen_end_scores, atol=2e-6)
    np.testing.assert_allclose(out.rejected_end_scores, ref.rejected_end_scores, atol=2e-6)
    np.testing.assert_array_equal(out.identical, ref.identical)
    np.testing.assert_allclose(out.loss, ref.loss, rtol=1e-6)
    assert np.isfinite(float(out.loss))
    ref_leaves = jax.tree.leaves(nnx.state(ref_grads))
    scale = max(float(np.abs(r).max()) for r in ref_leaves)
    for g, r in zip(jax.tree.leaves(nnx.state(grads)), ref_leaves, strict=True):
        np.testing.assert_allclose(g, r, atol=1e-5 * float(np.abs(r).max()) + 1e-7 * scale)


@pytest.mark.parametrize("layout", ["shared", "packed"])
@pytest.mark.parametrize(
    "attention,loss_type,lengths",
    [
        ("blocked", "span", "first_pad"),
        ("sdpa", "span", "first_pad"),
        ("blocked", "last_token", "first_pad"),
        ("blocked", "span", "explicit"),
    ],
)
def test_layout_matches_rows(layout, attention, loss_type, lengths):
    explicit = lengths == "explicit"
    tc = TrainConfig(loss_type=loss_type, lengths=lengths, use_margins=True)
    model = RewardModel(CFG.replace(attention=attention), rngs=nnx.Rngs(1))
    for seed in range(1):  # 12 pairs: every case twice
        batch = random_pairs(seed, B=12, explicit=explicit)
        if layout == "shared":
            lb = shared_batch(batch, PAD, explicit)
        else:
            lb = packed_batch(batch, PAD, row_len=40, explicit=explicit)
            assert lb["input_ids"].shape[0] < len(batch["margins"])  # several pairs per row
        assert_same_as_rows(model, batch, lb, tc)


def test_shared_row_structure():
    """Prompt once; the rejected suffix's positions restart where the prefix ends."""
    c = [5, 6, 7, 1, 2, PAD, PAD, PAD]
    r = [5, 6, 7, 3, PAD, PAD, PAD, PAD]
    batch = {"input_ids": np.array([c, r], np.int32), "margins": np.zeros(1, np.float32)}
    lb = shared_batch(batch, PAD, multiple=1)
    # div 3, ends 5 and 4: prefix [5, 6, 7], suffixes [1, 2] and [3, PAD] (PAD up to max end)
    assert lb["input_ids"].tolist() == [[5, 6, 7, 1, 2, 3, PAD]]
    assert lb["positions"].tolist() == [[0, 1, 2, 3, 4, 3, 4]]
    assert lb["branch_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 2]]
    assert lb["read"][:, 0].tolist() == [[-1, -1, -1, 3, 4], [-1, -1, -1, 5, 6]]
    assert lb["div"].tolist() == [3] and lb["ends"].tolist() == [[5], [4]]


def test_pack_first_fit_and_long_groups_alone():
    groups = [(np.zeros(n), [np.zeros(1), np.zeros(1)], n) for n in (3, 1, 12, 2)]
    assert pack(groups, row_len=12) == [[0, 1, 3], [2]]  # lengths 5, 3, 14 (alone), 4 (back in row 0)


def test_default_positions_and_one_segment_are_bit_identical():
    model = RewardModel(CFG, rngs=nnx.Rngs(0))
    ids = jnp.asarray(random_pairs(0)["input_ids"])
    B, T = ids.shape
    plain = model(ids)
    given = model(
        ids,
        positions=jnp.broadcast_to(jnp.arange(T), (B, T)),
        segment_ids=jnp.ones((B, T), jnp.int32),
        branch_ids=jnp.zeros((B, T), jnp.int32),
    )
    np.testing.assert_array_equal(plain, given)


def test_out_of_range_positions_are_refused():
    model = RewardModel(CFG, rngs=nnx.Rngs(0))
    ids = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="position id 64 at row 0, column 3"):
        model(ids, positions=jnp.array([[0, 1, 2, 64]]))
    with pytest.raises(ValueError, match="positions must have"):
        model(ids, positions=jnp.zeros((1, 3), jnp.int32))


@pytest.fixture
def always_layout(monkeypatch):
    """The steps run every batch in its layout (never the cheaper-rows fallback), so the layout's
    own math is what these tests compare with rows."""
    monkeypatch.setattr("jaxrm.step.layout_is_cheaper", lambda *args: True)


def test_twenty_adamw_steps_follow_the_rows_trajectory(always_layout):
    model = CFG.replace(embed_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, dropout=0.0)
    batches = [random_pairs(seed, B=6) for seed in range(4)]
    C = model.d_model
    losses, params = {}, {}
    for layout in ("rows", "shared", "packed"):
        tc = TrainConfig(batch_size=6, max_steps=20, warmup_steps=2, learning_rate=3e-3, layout=layout)
        step, state = make_train_step(model, tc), init_train_state(model, tc, seed=0)
        losses[layout] = []
        for i in range(20):
            state, metrics = step(state, shard_batch(batches[i % 4], None, 6, lengths=True))
            losses[layout].append(float(metrics["loss"]))
            assert metrics.get("rows_fallback", 0.0) == 0.0
        params[layout] = jax.device_get(state.params)
    for layout in ("shared", "packed"):
        np.testing.assert_allclose(losses[layout], losses["rows"], rtol=1e-4)
        assert_params_close(params[layout], params["rows"], C, atol=1e-4)
    assert losses["rows"][-1] < losses["rows"][0]  # it trained


def assert_params_close(params, reference, C: int, atol: float):
    """Parameters within atol, except those whose gradient is 0 in theory, which move by
    Adam-normalized rounding noise in every layout alike: ln_f's bias (a shift of every reward
    leaves a pairwise loss unchanged) and the key bias (softmax ignores a shift of all of a query's
    scores)."""
    for path, a in jax.tree_util.tree_leaves_with_path(params):
        names = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        b = reference
        for name in names:
            b = b[name]
        if names[0] == "ln_f" and names[-1] == "bias":
            continue
        if names[-2:] == ["c_attn", "bias"]:
            a, b = np.delete(a, np.s_[C : 2 * C]), np.delete(b, np.s_[C : 2 * C])
        np.testing.assert_allclose(a, b, atol=atol, err_msg=str(names))


def profile_pairs(prompt_len: int, answer_len: int, B: int = 4, T: int = 24, seed: int = 0) -> dict:
    """A rows batch of B pairs: a prompt of prompt_len tokens, then answers of answer_len or
    answer_len - 1 tokens that differ from their first token on."""
    rng = np.random.default_rng(seed)
    ids = np.full((2, B, T), PAD, np.int32)
    for i in range(B):
        prompt = rng.integers(0, 50, prompt_len)
        for side in range(2):
            answer = rng.integers(0, 50, answer_len - (i + side) % 2)
            answer[0] = 50 + side
            text = np.concatenate([prompt, answer])
            ids[side, i, : len(text)] = text
    margins = np.zeros(B, np.float32)
    return {
        "input_ids": ids.reshape(2 * B, T),
        "lengths": (ids != PAD).sum(-1).reshape(-1),
        "margins": margins,
    }


def test_attention_area_is_what_each_kernel_computes():
    assert attention_area(384, 128, sdpa=False) == 128 * (
        128 + 256 + 384
    )  # blocks above the diagonal skipped
    assert attention_area(20, 8, sdpa=False) == 8 * 8 + 8 * 16 + 4 * 20  # a short last block
    assert (
        attention_area(20, 0, sdpa=False) == attention_area(20, 8, sdpa=True) == 400
    )  # one block; sdpa: all


def test_cost_rule_picks_rows_for_answer_heavy_and_the_layout_for_prompt_heavy():
    from benchmarks.layouts import MODEL as BENCH_MODEL
    from benchmarks.layouts import profile_batch

    def cheaper(profile, layout):
        batch = profile_batch(profile, 8)[0]
        rows_shape = batch["input_ids"].shape  # (2B, T)
        lb = to_layout(batch, layout, BENCH_MODEL.pad_id, True, rows_shape[1])
        return layout_is_cheaper(rows_shape, lb["input_ids"].shape, BENCH_MODEL, sdpa=False)

    for layout in ("shared", "packed"):
        assert not cheaper("answer_heavy", layout)  # prompts 30-60 tokens, answers 200-300
        assert cheaper("prompt_heavy", layout) and cheaper("hh", layout)


def test_steps_fall_back_to_rows_when_the_layout_costs_more_and_agree_either_way():
    model = CFG.replace(num_layer=1, embed_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, dropout=0.0)
    steps = {}
    for name in ("rows", "packed"):  # shared takes the same path (_layout_train_step / _layout_eval_step)
        tc = TrainConfig(batch_size=4, max_steps=4, warmup_steps=1, layout=name)
        steps[name] = (tc, make_train_step(model, tc), make_eval_step(model, tc))
    # answer-heavy: rows 8 x 24 against layout rows 4 x 48; prompt-heavy: 8 x 24 against 4 x 32
    for batch, fallback in ((profile_pairs(2, 22), 1.0), (profile_pairs(18, 5), 0.0)):
        steps_batch = shard_batch(batch, None, 4, lengths=True)
        results = {}
        for name, (tc, train_step, eval_step) in steps.items():
            state, metrics = train_step(init_train_state(model, tc, seed=0), steps_batch)
            evaluated = eval_step(state.params, steps_batch)
            results[name] = jax.device_get((state.params, metrics, evaluated))
        (params, metrics, evaluated), (ref_params, ref_metrics, ref_evaluated) = (
            results["packed"],
            results["rows"],
        )
        assert metrics["rows_fallback"] == fallback
        if fallback:  # the rows step itself: the same numbers to the bit
            assert jax.tree.all(jax.tree.map(np.array_equal, params, ref_params))
            assert all(np.array_equal(evaluated[k], ref_evaluated[k]) for k in ref_evaluated)
            continue
        np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
        np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
        assert_params_close(params, ref_params, model.d_model, atol=1e-6)
        for key in ("chosen", "rejected", "loss"):
            np.testing.assert_allclose(evaluated[key], ref_evaluated[key], atol=2e-6)


def test_to_layout_takes_the_steps_layout_and_checks_the_name():
    batch = random_pairs(0, B=4)
    steps = {
        **batch,
        "input_ids": batch["input_ids"].reshape(2, 4, -1),
        "lengths": batch["lengths"].reshape(2, 4),
    }
    a = to_layout(steps, "shared", PAD, False, 24)
    b = shared_batch(batch, PAD)
    assert all(np.array_equal(a[k], b[k]) for k in b)
    with pytest.raises(ValueError, match="layout must be"):
        to_layout(steps, "rows", PAD, False, 24)


def test_cli_train_packed_then_eval_with_and_without_layout(tmp_path, capsys, always_layout):
    run = make_run(tmp_path)
    out = tmp_path / "packed"
    args = ["train", "--preset", "tiny", "--out", str(out), "--data", run.train.data, "--tokenizer=byte"]
    args += ["--vocab_size=257", "--d_model=32", "--max_steps=4", "--seq_len=32", "--batch_size=8"]
    args += [f"--eval_data={run.train.data}", "--layout=packed", "--eval_every=4"]
    assert cli.main(args) == 0
    assert "validation: pairwise accuracy" in capsys.readouterr().out
    results = {}
    for layout in (None, "rows", "shared"):
        extra = [] if layout is None else ["--layout", layout]
        assert cli.main(["eval", str(out), "--data", run.train.data, "--json", *extra]) == 0
        results[layout] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for layout in ("rows", "shared"):
        assert results[layout]["pairs"] == results[None]["pairs"] == 48
        for key in ("accuracy", "loss"):
            assert abs(results[layout][key] - results[None][key]) <= 1e-6, (layout, key)


def test_layout_savings_for_lint():
    pairs = [([1, 2, 3, 4, 5], [1, 2, 3, 9]), ([4, 4], [4, 4]), ([7], [8]), (list(range(9)), [0])]
    s = layout_savings(pairs, seq_len=8, pad_id=PAD, batch_size=2)
    # kept: pairs 0 and 2 (identical and too long dropped); shared: prefix [1, 2, 3] + 2 + 2, and 1 + 1
    assert s["pairs"] == 2 and s["tokens"] == {"rows": 32, "real": 11, "shared": 9}
    assert (
        s["shared_saves_vs_rows"] == round(1 - 9 / 32, 4) and s["packed_rows_per_batch"] == 2.0
    )  # 7 + 2 > 8
