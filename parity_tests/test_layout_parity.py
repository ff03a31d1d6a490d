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

    (jax_loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
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
