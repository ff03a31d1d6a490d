"""20 AdamW steps with warmup, cosine decay and clipping: jaxrm's train_step vs torchref's
configure_optimizers driven the nanoGPT way, from the same weights on the same batches."""

import dataclasses

import numpy as np
import pytest

from jaxrm import convert
from jaxrm.config import TrainConfig
from jaxrm.optim import learning_rate
from jaxrm.sharding import shard_batch
from jaxrm.state import init_train_state, merge_model
from jaxrm.step import make_train_step
from parity_tests.conftest import TINY_GPT2, mixed_pair_batch

torch = pytest.importorskip("torch")
import torchref  # noqa: E402

CONFIG = TINY_GPT2.replace(embed_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, dropout=0.0)
TRAIN = TrainConfig(
    batch_size=7,
    max_steps=20,
    learning_rate=3e-3,
    min_lr=3e-4,
    warmup_steps=5,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=0.5,
)
STEPS = 20


def batches():
    return [mixed_pair_batch(CONFIG, seed=100 + s % 2) for s in range(STEPS)]  # two batches, alternating


def torch_trajectory(model, data):
    optimizer = model.configure_optimizers(
        TRAIN.weight_decay, TRAIN.learning_rate, (TRAIN.beta1, TRAIN.beta2), "cpu"
    )
    losses = []
    for step, ids in enumerate(data):
        lr = float(
            learning_rate(
                step,
                peak=TRAIN.learning_rate,
                min_lr=TRAIN.min_lr,
                warmup_steps=TRAIN.warmup_steps,
                decay_steps=TRAIN.decay_steps,
            )
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        _, _, loss = model(torch.from_numpy(ids), None, None, return_loss=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN.grad_clip)
        optimizer.step()
        losses.append(loss.item())
    return losses


def jax_trajectory(model, data, train_config=TRAIN):
    state = init_train_state(CONFIG, train_config, model=model)
    step = make_train_step(CONFIG, train_config)
    losses, norms = [], []
    for ids in data:
        batch = {"input_ids": ids.astype(np.int32), "margins": np.zeros(len(ids) // 2, np.float32)}
        state, metrics = step(state, shard_batch(batch, None, len(ids) // 2))  # (2B, T) -> (2, B, T)
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    return losses, norms, convert.to_torch_state_dict(merge_model(CONFIG, state.params))


def test_twenty_adamw_steps_match_torchref():
    torch.manual_seed(0)
    tm = torchref.RewardModel(**CONFIG.torch_kwargs())
    jm = convert.from_torch_state_dict(CONFIG, tm.state_dict())
    data = batches()
    torch_losses = torch_trajectory(tm, data)
    jax_losses, norms, jax_params = jax_trajectory(jm, data)
    assert max(norms) > TRAIN.grad_clip  # clipping really happened
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=1e-4)
    assert torch_losses[-1] < torch_losses[0] - 0.05  # it learned something
    lr_sum = sum(
        float(
            learning_rate(
                s,
                peak=TRAIN.learning_rate,
                min_lr=TRAIN.min_lr,
                warmup_steps=TRAIN.warmup_steps,
                decay_steps=TRAIN.decay_steps,
            )
        )
        for s in range(STEPS)
    )
    for name, p in tm.state_dict().items():
        expected, got = p.numpy(), jax_params[name]
        null = null_gradient_part(name)
        for values in (expected, got):  # these drift only within what Adam's steps can reach
            assert np.abs(values[null]).max(initial=0) <= 1.5 * lr_sum, name
        assert_close_outside_null_part(name, got, expected, rtol=1e-4)


def null_gradient_part(name):
    """The part of a parameter whose gradient is 0 in exact arithmetic.

    The key bias (middle third of c_attn.bias) and ln_f.bias: softmax and a pairwise loss ignore
    constant shifts. Adam normalises their float noise (~1e-10) into steps of ~lr, so the two
    libraries drift apart there by design; every other parameter is compared exactly.
    """
    d = CONFIG.d_model
    if name.endswith("c_attn.bias"):
        return slice(d, 2 * d)
    return slice(None) if name == "ln_f.bias" else slice(0, 0)


def assert_close_outside_null_part(name, got, expected, rtol):
    keep = np.ones(expected.shape, bool)
    keep[null_gradient_part(name)] = False
    if keep.any():
        error = np.linalg.norm(got[keep] - expected[keep]) / np.linalg.norm(expected[keep])
        assert error <= rtol, f"{name}: parameter relative error {error:.2e}"


def test_gradient_accumulation_equals_the_full_batch():
    """8 pairs in 4 micro-batches of 2 give the 8-pair step (the mean is weighted correctly)."""
    config_data = [np.concatenate([b[:7][:4], b[7:][:4]]) for b in batches()[:3]]  # (8, T): 4 pairs
    full = dataclasses.replace(TRAIN, batch_size=4, normalize_by="nonidentical")
    accum = dataclasses.replace(full, grad_accum_steps=2)
    torch.manual_seed(1)
    tm = torchref.RewardModel(**CONFIG.torch_kwargs())
    sd = tm.state_dict()
    losses_full, _, params_full = jax_trajectory(convert.from_torch_state_dict(CONFIG, sd), config_data, full)
    losses_acc, _, params_acc = jax_trajectory(convert.from_torch_state_dict(CONFIG, sd), config_data, accum)
    np.testing.assert_allclose(losses_acc, losses_full, rtol=1e-5)
    for name in params_full:
        assert_close_outside_null_part(name, params_acc[name], params_full[name], rtol=1e-4)


def test_decay_groups_match_configure_optimizers(capsys):
    """The ndim >= 2 mask decays exactly the original's tensors; the printed counts are identical."""
    from jaxrm.optim import describe_decay
    from jaxrm.state import split_model

    torch.manual_seed(2)
    tm = torchref.RewardModel(**CONFIG.torch_kwargs())
    tm.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    printed = capsys.readouterr().out.splitlines()[:2]
    params = split_model(convert.from_torch_state_dict(CONFIG, tm.state_dict()))[1]
    assert describe_decay(params).splitlines() == printed
