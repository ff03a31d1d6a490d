"""Configuration: one frozen dataclass per concern, and named presets.

ModelConfig uses the original constructor's field names, so
`torchref.RewardModel(**config.torch_kwargs())` builds the same model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ACTIVATIONS = ("gelu", "gelu_tanh")  # exact erf (the seed's nn.GELU) | tanh (HF GPT-2)
DTYPES = ("float32", "bfloat16")
ATTENTIONS = ("auto", "blocked", "sdpa")
REMATS = ("auto", "none", "attention", "block")
SCAN_LAYERS = ("auto", "on", "off")
INIT_STD = 0.02  # Linear and Embedding weights ~ normal(0, INIT_STD); c_proj's / sqrt(2 * num_layer)


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
    # Execution plan: how the same function is computed (jaxrm/plan.py, benchmarks/NOTES.md).
    # auto (blocked on CPU, sdpa elsewhere) | blocked | sdpa (jax.nn.dot_product_attention)
    attention: str = "auto"
    attention_block: int = 128  # query rows per block of the blocked causal attention; 0 = one block
    remat: str = "auto"  # auto | none | attention | block: what the backward pass recomputes
    scan_layers: str = "auto"  # auto | on | off: lax.scan over the blocks (auto: on when remat is)
    remat_budget: float = 0.15  # auto remat when stored activations exceed this share of device memory

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "block_size", "num_heads", "dff", "num_layer"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.vocab_size < 2:
            raise ValueError("ModelConfig.vocab_size must be >= 2 (the last id is PAD)")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"ModelConfig.d_model={self.d_model} is not divisible by num_heads={self.num_heads}"
            )
        for name in ("embed_pdrop", "attn_pdrop", "resid_pdrop", "dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"ModelConfig.{name} must be a float in [0, 1), got {value!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ModelConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"ModelConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name, choices in (("attention", ATTENTIONS), ("remat", REMATS), ("scan_layers", SCAN_LAYERS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"ModelConfig.{name} must be one of {choices}, got {getattr(self, name)!r}")
        if (
            not isinstance(self.attention_block, int)
            or isinstance(self.attention_block, bool)
            or self.attention_block < 0
        ):
            raise ValueError(f"ModelConfig.attention_block must be an int >= 0, got {self.attention_block!r}")
        if not 0.0 < self.remat_budget <= 1.0:
            raise ValueError(f"ModelConfig.remat_budget must be in (0, 1], got {self.remat_budget!r}")

    @property
    def pad_id(self) -> int:
        """The original's PAD_ID = vocab_size - 1 (GPT-2's <|endoftext|> for vocab 50257)."""
        return self.vocab_size - 1

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def has_dropout(self) -> bool:
        """Whether any of the four dropout rates is non-zero (a train step then draws masks)."""
        return any((self.embed_pdrop, self.attn_pdrop, self.resid_pdrop, self.dropout))

    def torch_kwargs(self) -> dict:
        """Arguments for torchref.RewardModel (the original's constructor)."""
        names = (
            "vocab_size",
            "d_model",
            "block_size",
            "embed_pdrop",
            "num_heads",
            "dff",
            "attn_pdrop",
            "resid_pdrop",
            "dropout",
            "num_layer",
        )
        return {name: getattr(self, name) for name in names}

    PLAN_FIELDS = ("attention", "attention_block", "remat", "scan_layers", "remat_budget")
    """Fields that change how, not what, the model computes: a run may resume with other values."""

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


MODEL_PRESETS: dict[str, ModelConfig] = {
    # seconds on a CPU; for tests
    "tiny": ModelConfig(vocab_size=50257, d_model=64, block_size=64, num_heads=4, dff=256, num_layer=2),
    # the benchmarks' "small" shape (d=384, 6 layers)
    "small": ModelConfig(vocab_size=50257, d_model=384, block_size=256, num_heads=6, dff=1536, num_layer=6),
    # GPT-2 small, 124M
    "gpt2": ModelConfig(),
}


def model_preset(name: str) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    return MODEL_PRESETS[name]


NONFINITE_POLICIES = ("stop", "skip")
DEBUG_CHECKS = ("off", "checkify", "nans")  # TrainConfig.debug_checks (jaxrm/step.py)
LENGTHS = ("first_pad", "explicit")  # TrainConfig.lengths: where a sequence ends
LAYOUTS = ("rows", "shared", "packed")  # TrainConfig.layout: how pairs become model rows (jaxrm/layouts.py)
PAIR_LOSSES = ("span", "last_token")  # pair losses on padded rows (jaxrm/loss.py)
RANKING_LOSSES = ("plackett_luce", "all_pairs")  # listwise losses on K responses (jaxrm/ranking.py)
LOSS_TYPES = PAIR_LOSSES + RANKING_LOSSES  # TrainConfig.loss_type
NORMALIZE_BY = ("pairs", "nonidentical")  # TrainConfig.normalize_by: the loss's denominator
TRUNCATIONS = ("drop", "error", "left")  # TrainConfig.truncation: over-long pairs (jaxrm/data.py)
COORDINATOR_TIMEOUT_S = 300  # how long a process waits to join a multi-process job (jaxrm/sharding.py)
# Pairs per evaluation batch (validation during training, `jaxrm eval`); results do not depend on it
EVAL_BATCH_SIZE = 64


@dataclass(frozen=True)
class TrainConfig:
    # optimisation (the original's configure_optimizers + nanoGPT's schedule)
    batch_size: int = 16  # pairs per optimizer step (global)
    grad_accum_steps: int = 1  # micro-batches per step; batch_size must divide by it
    max_steps: int = 1000
    learning_rate: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    lr_decay_steps: int = 0  # 0: decay until max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables
    # loss (defaults: the original)
    loss_type: str = "span"  # span | last_token (pairs) | plackett_luce | all_pairs (K-wise rankings)
    use_margins: bool = False  # subtract the data's per-pair margin inside the logsigmoid
    center_rewards_coef: float = 0.0
    normalize_by: str = "pairs"
    # data
    data: str = ""  # "" = the bundled VADER pairs; else a JSON Lines file
    eval_data: str = ""  # validation pairs; "" = bundled validation split (with bundled data only)
    tokenizer: str = "gpt2"  # gpt2 | byte | path/to/tokenizer.json
    prompt_key: str = "prompt"  # column names in the data files (jaxrm/formats.py)
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    margin_key: str = "margin"
    chosen_ids_key: str = "input_ids_chosen"
    rejected_ids_key: str = "input_ids_rejected"
    responses_key: str = "responses"  # ranking rows (jaxrm/ranking_formats.py): responses best first,
    answers_key: str = "answers"  # Nectar's [{"answer", "rank"}],
    completions_key: str = "completions"  # or completions with their scores
    scores_key: str = "scores"
    seq_len: int = 0  # padded length T; 0 = block_size
    truncation: str = "drop"  # over-long pairs: drop | error | left (cut the shared prompt from the left)
    lengths: str = "first_pad"  # sequence ends: first_pad (the original: the first PAD ends a sequence) |
    # explicit (each row's true length; a PAD / end-of-text id may be in the text)
    group_by_length: int = (
        0  # >0: batches of similar-length pairs, sorted within windows of this many batches
    )
    pad_multiple: int = 0  # >0: trim each batch's padding to its longest pair, rounded up to this
    # rows (2B padded rows) | shared (one row per pair: the prompt once) | packed (shared groups,
    # several per row of seq_len tokens); jaxrm/layouts.py; the same loss and gradients
    layout: str = "rows"
    # run
    seed: int = 0
    eval_every: int = 200
    eval_pairs: int = 2048  # validation pairs per periodic eval (0 = all)
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    log_every: int = 10
    tensorboard: bool = False  # also write TensorBoard event files into the run directory (tensorboardX)
    nonfinite: str = "stop"  # stop | skip a step whose loss or gradient is NaN/inf
    max_nonfinite_skips: int = 10  # consecutive skips allowed with nonfinite="skip"
    deterministic: bool = False  # deterministic GPU ops (XLA_FLAGS, jaxrm/runtime.py); CPU is always
    debug_checks: str = "off"  # off | checkify (index, NaN, division checks) | nans (jax_debug_nans)
    # devices (jaxrm/sharding.py): 1 x 1 = one device, unsharded
    mesh_data: int = 1  # data parallel: params replicated, batch split
    mesh_fsdp: int = 1  # fully sharded: params + optimizer state split, batch split

    def __post_init__(self):
        for name in (
            "batch_size",
            "grad_accum_steps",
            "max_steps",
            "log_every",
            "eval_every",
            "checkpoint_every",
            "keep_checkpoints",
            "mesh_data",
            "mesh_fsdp",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {value!r}")
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(
                f"TrainConfig.batch_size={self.batch_size} does not divide by "
                f"grad_accum_steps={self.grad_accum_steps}"
            )
        for name, choices in (
            ("loss_type", LOSS_TYPES),
            ("normalize_by", NORMALIZE_BY),
            ("debug_checks", DEBUG_CHECKS),
            ("nonfinite", NONFINITE_POLICIES),
            ("truncation", TRUNCATIONS),
            ("lengths", LENGTHS),
            ("layout", LAYOUTS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"TrainConfig.{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.loss_type in RANKING_LOSSES and (self.use_margins or self.center_rewards_coef):
            raise ValueError(
                f"TrainConfig.loss_type={self.loss_type!r} (rankings) takes no use_margins or "
                f"center_rewards_coef; those are pair-loss options"
            )
        if not self.learning_rate > 0:
            raise ValueError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.min_lr <= self.learning_rate:
            raise ValueError(
                f"TrainConfig.min_lr={self.min_lr} must be in [0, learning_rate={self.learning_rate}]"
            )

    @property
    def decay_steps(self) -> int:
        return self.lr_decay_steps or self.max_steps


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs: the single source of truth saved with every checkpoint."""

    model: ModelConfig
    train: TrainConfig

    def to_dict(self) -> dict:
        return {"model": dataclasses.asdict(self.model), "train": dataclasses.asdict(self.train)}

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        return cls(
            model=_build(ModelConfig, d.get("model", {}), "model"),
            train=_build(TrainConfig, d.get("train", {}), "train"),
        )

    def override(self, overrides: dict[str, str]) -> RunConfig:
        """Apply `key=value` strings: `lr`-style bare names or `model.x` / `train.x`; types checked."""
        model, train = {}, {}
        for key, raw in overrides.items():
            section, name = key.split(".", 1) if "." in key else (None, key)
            model_fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
            train_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
            if section == "model" or (section is None and name in model_fields):
                target, fields = model, model_fields
            elif section == "train" or (section is None and name in train_fields):
                target, fields = train, train_fields
            else:
                raise ValueError(
                    f"unknown config key {key!r}; valid keys: "
                    f"{', '.join(sorted(model_fields) + sorted(train_fields))}"
                )
            if name not in fields:
                raise ValueError(f"unknown config key {key!r}; {section} keys: {', '.join(sorted(fields))}")
            target[name] = _parse_value(
                key, raw, type(getattr(self.model if fields is model_fields else self.train, name))
            )
        return RunConfig(model=self.model.replace(**model), train=dataclasses.replace(self.train, **train))


def _parse_value(key: str, raw, kind):
    if not isinstance(raw, str):
        return raw
    try:
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return kind(raw) if kind is not int else int(raw, 10)
    except ValueError:
        raise ValueError(f"config key {key!r} needs a {kind.__name__}, got {raw!r}") from None


def _build(cls, values: dict, section: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {section} config keys {unknown}")
    return cls(**values)


# The default of a bare `jaxrm train`: about 10 minutes on 2 CPU cores, all bundled pairs fit in T=96.
BASE_MODEL = ModelConfig(vocab_size=50257, d_model=256, block_size=128, num_heads=4, dff=1024, num_layer=4)

RUN_PRESETS: dict[str, RunConfig] = {
    "tiny": RunConfig(
        MODEL_PRESETS["tiny"],
        TrainConfig(
            batch_size=8,
            max_steps=50,
            warmup_steps=5,
            eval_every=25,
            checkpoint_every=25,
            log_every=5,
            eval_pairs=256,
            seq_len=64,
        ),
    ),
    "base": RunConfig(
        BASE_MODEL,
        TrainConfig(
            batch_size=32,
            max_steps=600,
            learning_rate=1e-3,
            min_lr=1e-4,
            warmup_steps=50,
            seq_len=96,
            group_by_length=64,
            pad_multiple=16,
            eval_every=100,
            eval_pairs=1024,
            checkpoint_every=100,
            log_every=20,
        ),
    ),
    "small": RunConfig(
        MODEL_PRESETS["small"],
        TrainConfig(batch_size=16, max_steps=2000, seq_len=128, group_by_length=64, pad_multiple=16),
    ),
    "gpt2": RunConfig(MODEL_PRESETS["gpt2"], TrainConfig(batch_size=8, max_steps=5000, seq_len=128)),
}
DEFAULT_RUN_PRESET = "base"


def run_preset(name: str) -> RunConfig:
    if name not in RUN_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(RUN_PRESETS)}")
    return RUN_PRESETS[name]
