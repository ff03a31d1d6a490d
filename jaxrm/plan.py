"""The execution plan: how the model's blocks run on given devices. The function computed is
the same under every plan; only speed and memory differ (measurements in benchmarks/NOTES.md).

ModelConfig's plan fields (attention, attention_block, remat, scan_layers, remat_budget) say what
the user wants; execution_plan() turns them into a Plan for an input of shape (B, T) on the
devices the arrays live on:
- remat "auto": when the activations a train step would store are small against the devices'
  memory, run the blocks unrolled and store everything (fastest on CPU); when they are large
  (GPT-2 at T=512: ~10 GB), scan over the layers and recompute inside each block (2.6x less
  memory). Remat only takes effect under lax.scan on XLA:CPU, hence the pairing. "block" saves
  only qkv, the attention output, the mid-block residual and the MLP pre-activation per layer
  (LayerNorms, attention probs, GELU and dropout masks are recomputed); "attention" recomputes
  only the attention probabilities.
- attention "auto": blocked causal attention on CPU, jax.nn.dot_product_attention elsewhere.
- cpu_layouts: XLA:CPU's row-major copies (jaxrm/kernels.py), on CPU devices only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxrm.config import ModelConfig


@dataclass(frozen=True)
class Plan:
    scan_layers: bool  # lax.scan over the blocks (the per-layer parameters stacked inside the step)
    remat: str  # none | attention | block: what the backward pass recomputes
    attention: str  # blocked | sdpa
    cpu_layouts: bool  # write transposes out row-major for XLA:CPU's fast bfloat16 dots


def execution_plan(cfg: ModelConfig, B: int, T: int, devices=None) -> Plan:
    """The plan for a (B, T) input on `devices` (default: JAX's default devices)."""
    devices = list(devices) if devices is not None else jax.devices()
    on_cpu = devices[0].platform == "cpu"
    remat = cfg.remat
    if remat == "auto":
        big = stored_activation_bytes(cfg, B, T) > cfg.remat_budget * device_memory(devices)
        remat = "block" if big else "none"
    scan = remat != "none" if cfg.scan_layers == "auto" else cfg.scan_layers == "on"
    attention = cfg.attention if cfg.attention != "auto" else ("blocked" if on_cpu else "sdpa")
    return Plan(scan_layers=scan and cfg.num_layer > 1, remat=remat, attention=attention, cpu_layouts=on_cpu)


def devices_of(x):
    """The devices a concrete jax.Array lives on; None for a traced or host value."""
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        return x.devices()
    return None


def stored_activation_bytes(cfg: ModelConfig, B: int, T: int) -> float:
    """Rough size of what backprop through the unrolled model keeps (fitted to XLA:CPU's buffer
    assignment: ~4 tensors of width dff, ~12 of d_model and ~3 of nh*T per token and layer)."""
    per_token = 4 * cfg.dff + 12 * cfg.d_model + 3 * cfg.num_heads * T
    return 4.0 * per_token * B * T * cfg.num_layer


def device_memory(devices) -> float:
    """Memory the activations of a step spread over `devices` can use: the host's RAM for CPU
    devices (they share it), else the sum of the devices' own memory."""
    if devices[0].platform == "cpu":
        return host_memory()
    limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices]
    return float(sum(limits)) if all(limits) else host_memory()


def host_memory() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


_BLOCK_POLICY = jax.checkpoint_policies.save_only_these_names("qkv", "attn_y", "x_mid", "fc_h")


def run_blocks(block, blocks: list, x, cfg: ModelConfig, plan: Plan, keys):
    """x through block(params, x, cfg, plan, key) for each block's params in order, as the plan
    says: unrolled, or lax.scan over the per-layer params stacked on a leading axis; remat "block"
    wraps each block in jax.checkpoint saving only the activations named in the model."""
    if plan.remat == "block":
        in_scan = plan.scan_layers and len(blocks) > 1
        block = jax.checkpoint(block, static_argnums=(2, 3), policy=_BLOCK_POLICY, prevent_cse=not in_scan)
    if plan.scan_layers and len(blocks) > 1:
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *blocks)  # each leaf (L, ...)

        def body(x, layer):
            params, key = layer
            return block(params, x, cfg, plan, key), None

        x, _ = jax.lax.scan(body, x, (stacked, None if keys is None else keys[: len(blocks)]))
        return x
    for i, params in enumerate(blocks):
        x = block(params, x, cfg, plan, None if keys is None else keys[i])
    return x
