"""The train state (step, parameters, optimizer state, dropout key) and the model <-> params helpers."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from jaxrm.config import ModelConfig, TrainConfig
from jaxrm.model import RewardModel
from jaxrm.optim import make_optimizer


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # () int32: optimizer steps taken (skipped non-finite steps included)
    params: Any  # nested dict of float32 arrays (nnx pure dict of the model's Params)
    opt_state: Any
    rng: jax.Array  # (2,) uint32 base key; step s uses fold_in(rng, s) for dropout


def split_model(model: RewardModel):
    """(graphdef, params as a pure nested dict) of a model."""
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(params)


def model_graphdef(model_config: ModelConfig):
    """The model's structure without computing its weights (what params are merged into)."""
    return nnx.split(nnx.eval_shape(lambda: RewardModel(model_config, rngs=nnx.Rngs(0))), nnx.Param)[0]


def merge_model(model_config: ModelConfig, params) -> RewardModel:
    """A RewardModel holding `params` (a pure dict, e.g. TrainState.params)."""
    return nnx.merge(model_graphdef(model_config), params)


def init_train_state(
    model_config: ModelConfig, train_config: TrainConfig, seed: int = 0, model: RewardModel | None = None
) -> TrainState:
    """A fresh state: the given model's weights, or a new init from `seed`."""
    model = model if model is not None else RewardModel(model_config, rngs=nnx.Rngs(seed))
    _, params = split_model(model)
    optimizer = make_optimizer(train_config, params)
    return TrainState(
        step=jnp.int32(0),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.key(seed + 1)),
    )


def abstract_train_state(model_config: ModelConfig, train_config: TrainConfig) -> TrainState:
    """Shapes and dtypes of a TrainState, without computing one (a restore target)."""
    return jax.eval_shape(lambda: init_train_state(model_config, train_config, 0))
