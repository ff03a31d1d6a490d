"""Configuration: one frozen dataclass per concern, and named presets.

ModelConfig uses the original constructor's field names, so
`torchref.RewardModel(**config.torch_kwargs())` builds the same model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ACTIVATIONS = ("gelu", "gelu_tanh")  # exact erf (the seed's nn.GELU) | tanh (HF GPT-2)
DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 50257
    d_model: int = 768
    block_size: int = 1024
    embed_pdrop: float = 0.1
    num_heads: int = 12
    dff: int = 3072
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    dropout: float = 0.1
    num_layer: int = 12
    activation: str = "gelu"
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"  # matmul compute dtype; params, LayerNorm, softmax, head stay float32

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "block_size", "num_heads", "dff", "num_layer"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.vocab_size < 2:
            raise ValueError("ModelConfig.vocab_size must be >= 2 (the last id is PAD)")
        if self.d_model % self.num_heads:
            raise ValueError(f"ModelConfig.d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        for name in ("embed_pdrop", "attn_pdrop", "resid_pdrop", "dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"ModelConfig.{name} must be a float in [0, 1), got {value!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ModelConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"ModelConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")

    @property
    def pad_id(self) -> int:
        """The original's PAD_ID = vocab_size - 1 (GPT-2's <|endoftext|> for vocab 50257)."""
        return self.vocab_size - 1

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def torch_kwargs(self) -> dict:
        """Arguments for torchref.RewardModel (the original's constructor)."""
        names = ("vocab_size", "d_model", "block_size", "embed_pdrop", "num_heads", "dff",
                 "attn_pdrop", "resid_pdrop", "dropout", "num_layer")
        return {name: getattr(self, name) for name in names}

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


MODEL_PRESETS: dict[str, ModelConfig] = {
    # seconds on a CPU; for tests
    "tiny": ModelConfig(vocab_size=50257, d_model=64, block_size=64, num_heads=4, dff=256, num_layer=2),
    # the default of a bare `jaxrm train`: minutes on 2 CPU cores
    "small": ModelConfig(vocab_size=50257, d_model=384, block_size=256, num_heads=6, dff=1536, num_layer=6),
    # GPT-2 small, 124M
    "gpt2": ModelConfig(),
}


def model_preset(name: str) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    return MODEL_PRESETS[name]
