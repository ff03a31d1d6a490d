"""jaxrm's shared and packed layouts against torchref on the unshared rows: the original's end
scores, loss and gradients, from rows that hold each prompt once (jaxrm/layouts.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrm import convert
from jaxrm.config import TrainConfig
from jaxrm.layouts import packed_batch, shared_batch
from jaxrm.step import layout_loss, layout_rewards
from parity_tests.conftest import TINY_GPT2, mixed_pair_batch

torch = pytest.importorskip("torch")
import torchref  # noqa: E402


@pytest.mark.parametrize("layout", ["shared", "packed"])
def test_layouts_match_torchref_on_rows(layout, jax_device):
    torch.manual_seed(7)
    tm = torchref.RewardModel(**TINY_GPT2.torch_kwargs()).eval()
    config = TINY_GPT2.replace(attention_block=8)
    jm = convert.from_torch_state_dict(config, tm.state_dict())
    ids = mixed_pair_batch(seed=7)  # (2 * 7, 16): identical, padded, divergence at the last token, ...
    rows = {"input_ids": ids.astype(np.int32), "margins": np.zeros(ids.shape[0] // 2, np.float32)}
    pad = TINY_GPT2.pad_id
    lb = shared_batch(rows, pad) if layout == "shared" else packed_batch(rows, pad, row_len=32)
    c_scores, r_scores, loss = tm(torch.from_numpy(ids), None, None, return_loss=True)
    loss.backward()

    graphdef, params = nnx.split(jm, nnx.Param)

    def loss_fn(params):
        rewards = layout_rewards(nnx.merge(graphdef, params), {k: jnp.asarray(v) for k, v in lb.items()})
        out = layout_loss(rewards, lb, TrainConfig())
        return out.loss, out

    (jax_loss, out), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    identical = np.asarray(out.identical)
    np.testing.assert_allclose(np.asarray(out.chosen_end_scores), [s.item() for s in c_scores], atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(out.rejected_end_scores)[~identical], [s.item() for s in r_scores], atol=1e-5
    )
    np.testing.assert_allclose(float(jax_loss), loss.item(), rtol=1e-5)
    jax_grads = convert.to_torch_state_dict(nnx.merge(graphdef, grads))
    for name, p in tm.named_parameters():
        error = np.linalg.norm(jax_grads[name] - p.grad.numpy())
        assert error <= 1e-4 * np.linalg.norm(p.grad.numpy()) + 1e-8, f"{name}: gradient error {error:.2e}"


def _torch_plackett_luce(scores: list, ranks: list):
    """-sum_j [r_j - logsumexp(r_l : rank_l >= rank_j)] over responses j that are better than
    someone (ties: Breslow's rule), written from the formula in torch."""
    loss = 0.0
    for s, r in zip(scores, ranks):
        r = torch.tensor(r)
        for j in range(len(s)):
            if (r > r[j]).any():
                loss = loss + torch.logsumexp(s[r >= r[j]], 0) - s[j]
    return loss / len(scores)


@pytest.mark.parametrize("layout", ["shared", "packed"])
def test_rankings_match_torchref_on_rows(layout, jax_device):
    """K-wise rankings with the prompt once against torchref's forward on each response's own padded
    row (end scores read by the original's loop) and a plackett_luce loss written in torch."""
    from jaxrm.layouts import ranking_batch
    from jaxrm.ranking import ranking_loss
    from jaxrm.ranking_step import ranking_scores

    torch.manual_seed(3)
    tm = torchref.RewardModel(**TINY_GPT2.torch_kwargs()).eval()
    jm = convert.from_torch_state_dict(TINY_GPT2.replace(attention_block=8), tm.state_dict())
    pad, rng = TINY_GPT2.pad_id, np.random.default_rng(3)
    groups, ranks = [], []
    for k, p in ((3, 5), (4, 1), (2, 7)):  # responses, prompt tokens
        prompt = rng.integers(0, 1000, p)
        groups.append(
            [np.concatenate([prompt, [j], rng.integers(0, 1000, rng.integers(0, 6))]) for j in range(k)]
        )
        ranks.append(list(range(1, k)) + [k - 1])  # the last two tied
    rows = np.full((sum(map(len, groups)), 16), pad, np.int64)
    flat = [s for g in groups for s in g]
    for i, s in enumerate(flat):
        rows[i, : len(s)] = s
    batch = {
        "input_ids": rows.astype(np.int32),
        "lengths": np.array([len(s) for s in flat], np.int32),
        "ranks": np.array([r for rs in ranks for r in rs], np.int32),
        "offsets": np.cumsum([0] + [len(g) for g in groups]),
    }
    ids = torch.from_numpy(np.concatenate([rows, rows]))  # (2M, T): each row paired with itself
    end_scores = tm(ids, None, None)[0]  # identical pairs: the original reads the chosen end score
    sizes = np.cumsum([0] + [len(g) for g in groups])
    loss = _torch_plackett_luce([torch.stack(end_scores[a:b]) for a, b in zip(sizes, sizes[1:])], ranks)
    loss.backward()

    lb = ranking_batch(batch, layout, pad, row_len=32)
    graphdef, params = nnx.split(jm, nnx.Param)

    def loss_fn(params):
        scores = ranking_scores(nnx.merge(graphdef, params), {k: jnp.asarray(v) for k, v in lb.items()})
        return ranking_loss(scores, lb["ranks"], lb["valid"]).mean(), scores

    (jax_loss, scores), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    np.testing.assert_allclose(np.asarray(scores)[lb["valid"]], [s.item() for s in end_scores], atol=1e-5)
    np.testing.assert_allclose(float(jax_loss), loss.item(), rtol=1e-5)
    jax_grads = convert.to_torch_state_dict(nnx.merge(graphdef, grads))
    largest = max(np.linalg.norm(p.grad.numpy()) for p in tm.parameters())
    for name, p in tm.named_parameters():  # ln_f.bias: a shift of every score, true gradient 0
        error = np.linalg.norm(jax_grads[name] - p.grad.numpy())
        bound = 1e-4 * np.linalg.norm(p.grad.numpy()) + 1e-6 * largest
        assert error <= bound, f"{name}: gradient error {error:.2e}"
