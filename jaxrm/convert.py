"""Weights between jaxrm and the torch state_dict of torchref.RewardModel.

One explicit rename table, generated from num_layer; strict key-set and shape checks.
Rules: Linear weight (out, in) <-> kernel (in, out) transposed; LayerNorm weight <-> scale;
Embedding weight <-> embedding.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrm.config import ModelConfig
from jaxrm.model import RewardModel

Path = tuple  # a path into the NNX state, e.g. ("h", 0, "attn", "c_attn", "kernel")


class ConversionError(ValueError):
    pass


def rename_table(num_layer: int) -> dict[str, tuple[Path, bool]]:
    """torch state_dict key -> (jaxrm state path, transpose?)."""
    table = {"wte.weight": (("wte", "embedding"), False), "wpe.weight": (("wpe", "embedding"), False)}
    for i in range(num_layer):  # in torchref's registration order
        for module in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            parts = ("h", i, *module.split("."))
            is_norm = module.startswith("ln")
            table[f"h.{i}.{module}.weight"] = ((*parts, "scale" if is_norm else "kernel"), not is_norm)
            table[f"h.{i}.{module}.bias"] = ((*parts, "bias"), False)
    table["reward_head.weight"] = (("reward_head", "kernel"), True)
    table["ln_f.weight"] = (("ln_f", "scale"), False)
    table["ln_f.bias"] = (("ln_f", "bias"), False)
    return table


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu().float().numpy() if value.is_floating_point() else value.detach().cpu().numpy()
    return np.asarray(value)


def _check_keys(expected, found, what: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        raise ConversionError(f"{what} does not match the model config: " + "; ".join(parts))


def abstract_model(config: ModelConfig) -> RewardModel:
    """A RewardModel whose params are shape-only placeholders (no init cost)."""
    return nnx.eval_shape(lambda: RewardModel(config, rngs=nnx.Rngs(0)))


def from_torch_state_dict(config: ModelConfig, state_dict) -> RewardModel:
    """A jaxrm RewardModel holding the weights of a torchref.RewardModel state_dict."""
    table = rename_table(config.num_layer)
    _check_keys(table, state_dict, "state_dict")
    model = abstract_model(config)
    state = nnx.state(model, nnx.Param)
    flat = dict(state.flat_state())
    for key, (path, transpose) in table.items():
        value = _to_numpy(state_dict[key])
        value = value.T if transpose else value
        expected = flat[path].shape
        if value.shape != expected:
            shown = value.T.shape if transpose else value.shape
            raise ConversionError(f"state_dict[{key!r}] has shape {tuple(shown)}, the config needs "
                                  f"{tuple(expected[::-1]) if transpose else tuple(expected)}")
        flat[path].set_value(jnp.array(value, jnp.float32))  # a copy: never alias the caller's buffers
    nnx.update(model, nnx.State.from_flat_path(flat))
    return model


def to_torch_state_dict(model: RewardModel) -> dict[str, np.ndarray]:
    """The torchref state_dict (keys in torchref's order) as float32 numpy arrays."""
    flat = dict(nnx.state(model, nnx.Param).flat_state())
    table = rename_table(model.config.num_layer)
    _check_keys({path for path, _ in table.values()}, flat, "model state")
    out = {}
    for key, (path, transpose) in table.items():
        value = np.asarray(flat[path][...], np.float32)
        out[key] = np.ascontiguousarray(value.T if transpose else value)
    return out
