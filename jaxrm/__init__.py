"""jaxrm: reward-model training for RLHF in JAX / Flax NNX.

Names are imported lazily, so `jaxrm` (the CLI) can set up the process before JAX loads.
Importing jaxrm tunes glibc's malloc for XLA:CPU (jaxrm/runtime.py; JAXRM_MALLOC_TUNING=0: not).
"""

import importlib

from jaxrm import runtime

runtime.tune_malloc()  # before XLA allocates its first buffers

_EXPORTS = {
    "ModelConfig": "jaxrm.config",
    "TrainConfig": "jaxrm.config",
    "RunConfig": "jaxrm.config",
    "MODEL_PRESETS": "jaxrm.config",
    "model_preset": "jaxrm.config",
    "run_preset": "jaxrm.config",
    "RewardModel": "jaxrm.model",
    "pairwise_loss": "jaxrm.loss",
    "PairwiseOutput": "jaxrm.loss",
    "sequence_ends": "jaxrm.loss",
    "validate_pair_batch": "jaxrm.loss",
    "PairBatchError": "jaxrm.loss",
}
_SUBMODULES = (
    "convert",
    "state",
    "step",
    "loop",
    "evaluate",
    "metrics",
    "data",
    "tokenizer",
    "checkpoint",
    "optim",
    "loss",
    "model",
    "config",
)

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"jaxrm.{name}")
    raise AttributeError(f"module 'jaxrm' has no attribute {name!r}")
