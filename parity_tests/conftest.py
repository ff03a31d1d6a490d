"""Shared setup for jaxrm-vs-torchref parity: float32 and no TF32 in torch (JAX's highest matmul
precision is set in the repository's conftest.py), the tiny GPT-2-shaped config, a batch covering
the original's cases, and jaxrm's gradients under torch's parameter names."""

import jax
import numpy as np
from flax import nnx

try:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
except ImportError:  # tests that need torch skip themselves
    torch = None

from jaxrm import ModelConfig, convert, pairwise_loss  # noqa: E402

# GPT-2-shaped (vocab 50257, PAD = <|endoftext|>), tiny sizes.
TINY_GPT2 = ModelConfig(vocab_size=50257, d_model=64, block_size=32, num_heads=4, dff=256, num_layer=2)


def mixed_pair_batch(config: ModelConfig = TINY_GPT2, T: int = 16, seed: int = 0) -> np.ndarray:
    """(2*bs, T) int64 ids covering the cases the original's loop distinguishes.

    Pairs: 0 no padding; 1 different lengths; 2 identical (padded); 3 divergence right after a
    shared prompt; 4 divergence at the last real token; 5 one side ends before the divergence of
    the other; 6 identical, no padding.
    """
    rng = np.random.default_rng(seed)
    pad = config.pad_id

    def text(n):
        return rng.integers(0, pad, size=n)  # never PAD inside the text

    def padded(tokens):
        return np.concatenate([tokens, np.full(T - len(tokens), pad)])

    prompt = text(6)
    pairs = []
    pairs.append((np.concatenate([prompt[:4], text(T - 4)]), np.concatenate([prompt[:4], text(T - 4)])))
    pairs.append(
        (padded(np.concatenate([prompt[:5], text(5)])), padded(np.concatenate([prompt[:5], text(9)])))
    )
    same = padded(np.concatenate([prompt, text(4)]))
    pairs.append((same, same.copy()))
    pairs.append((padded(np.concatenate([prompt, text(7)])), padded(np.concatenate([prompt, text(3)]))))
    shared = np.concatenate([prompt, text(5)])
    last_c, last_r = rng.choice(pad, size=2, replace=False)
    pairs.append((padded(np.concatenate([shared, [last_c]])), padded(np.concatenate([shared, [last_r]]))))
    short = np.concatenate([prompt, text(2)])
    pairs.append((padded(short), padded(np.concatenate([short, text(5)]))))
    full = text(T)
    pairs.append((full, full.copy()))
    chosen = np.stack([c for c, _ in pairs])
    rejected = np.stack([r for _, r in pairs])
    return np.concatenate([chosen, rejected]).astype(np.int64)  # (2*bs, T)


def jax_grads_as_state_dict(jm, ids, pad_id):
    """(loss, {torchref state_dict key: gradient}) of the original's pairwise loss for the model `jm`."""
    graphdef, params = nnx.split(jm, nnx.Param)

    def loss_fn(params):
        return pairwise_loss(nnx.merge(graphdef, params)(ids), ids, pad_id).loss

    loss, grads = jax.value_and_grad(loss_fn)(params)
    return float(loss), convert.to_torch_state_dict(nnx.merge(graphdef, grads))
