"""What is measured: the benchmark cases, their input batch and their model FLOPs.

Tokens/step = 2 * pairs * T (chosen + rejected rows, padding included: both sides compute it).
Model FLOPs (nanoGPT's estimate): per token 6N + 12 L d T for a train step, 2N + 4 L d T for
scoring, N = parameters of the matmuls (embeddings are gathers and excluded).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxrm.config import model_preset


@dataclasses.dataclass(frozen=True)
class Case:
    name: str  # e.g. "small" or "seq512"
    preset: str  # model preset
    pairs: int
    T: int
    dtype: str  # float32 | bfloat16
    group: str = "main"  # main | seqlen | short

    @property
    def tokens(self) -> int:
        return 2 * self.pairs * self.T


SHAPES = {"tiny": (8, 64), "small": (16, 256), "gpt2": (4, 512)}  # preset -> (pairs, T)


def cases_for(args) -> list[Case]:
    """The cases the parsed flags ask for (--quick, --configs, --dtypes, --no-seqlen, --no-short)."""
    if args.quick:
        return [Case("tiny", "tiny", 8, 64, "float32"), Case("small", "small", 4, 256, "float32")]
    out = []
    for preset in args.configs:
        pairs, T = SHAPES[preset]
        for dt in args.dtypes:
            out.append(Case(preset, preset, pairs, T, dt))
    if args.seqlen:
        for T in (128, 256, 512, 1024):
            out.append(Case(f"seq{T}", "small", max(1, 2048 // T), T, "float32", "seqlen"))
    if args.short:
        out.append(Case("short64x64", "small", 64, 64, "float32", "short"))
    return out


def model_config(case: Case):
    """The case's preset, with block_size raised to T when needed, in the case's dtype."""
    cfg = model_preset(case.preset)
    if case.T > cfg.block_size:
        cfg = cfg.replace(block_size=case.T)
    return cfg.replace(dtype=case.dtype)


def make_batch(cfg, pairs: int, T: int, seed: int = 0) -> dict:
    """Pairs with a shared prompt (so chosen/rejected diverge after position 0), varied lengths,
    right padding with PAD = vocab_size - 1. Rows: chosen 0..pairs-1, then rejected."""
    rng = np.random.default_rng(seed)
    pad = cfg.pad_id
    ids = np.full((2 * pairs, T), pad, np.int32)
    lengths = np.zeros(2 * pairs, np.int32)
    for i in range(pairs):
        prompt_len = int(rng.integers(max(1, T // 8), max(2, T // 3)))
        prompt = rng.integers(0, pad, prompt_len)
        for row in (i, pairs + i):
            n = T if i == 0 else int(rng.integers(prompt_len + 1, T + 1))  # pair 0: no padding
            ids[row, :prompt_len] = prompt
            ids[row, prompt_len:n] = rng.integers(0, pad, n - prompt_len)
            lengths[row] = n
        if ids[i, prompt_len] == ids[pairs + i, prompt_len]:  # make sure they diverge at prompt_len
            ids[pairs + i, prompt_len] = (ids[i, prompt_len] + 1) % pad
    return {"input_ids": ids, "lengths": lengths, "margins": np.zeros(pairs, np.float32)}


def matmul_params(cfg) -> int:
    """Parameters that take part in matmuls (no wte / wpe gathers)."""
    d, L, f = cfg.d_model, cfg.num_layer, cfg.dff
    per_layer = (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
    return L * per_layer + 2 * d + d  # + ln_f + reward head


def flops_per_token(cfg, T: int, train: bool) -> float:
    """nanoGPT's estimate: 6N + 12 L d T per trained token, 2N + 4 L d T per scored token."""
    n = matmul_params(cfg)
    attn = 12 * cfg.num_layer * cfg.d_model * T
    return 6 * n + attn if train else 2 * n + attn / 3
