"""jaxrm: reward-model training for RLHF in JAX / Flax NNX."""
from jaxrm.config import MODEL_PRESETS, ModelConfig, model_preset
from jaxrm.loss import PairBatchError, PairwiseOutput, pairwise_loss, sequence_ends, validate_pair_batch
from jaxrm.model import RewardModel
from jaxrm import convert  # noqa: E402  (jaxrm.convert.from_torch_state_dict, ...)

__all__ = ["ModelConfig", "MODEL_PRESETS", "model_preset", "RewardModel", "pairwise_loss",
           "PairwiseOutput", "sequence_ends", "validate_pair_batch", "PairBatchError", "convert"]
