"""Helpers shared by several test modules (`from tests.conftest import ...`): a tiny byte-level model,
synthetic preference data, a run config on it, and the rows every preference-file format holds.
The `jax_device` fixture and the matmul precision are set for all tests in the repository's conftest.py."""

import json

import numpy as np

from jaxrm.checkpoint import load_safetensors
from jaxrm.config import ModelConfig, RunConfig, TrainConfig
from jaxrm.formats import PreferencePair

MODEL = ModelConfig(vocab_size=257, d_model=32, block_size=64, num_heads=4, dff=64, num_layer=2)

# one table in every file format (tests/test_formats.py, tests/test_hf_datasets.py), and the pairs it holds
ROWS = [
    {"prompt": "Q: 1+1? ", "chosen": "A: 2", "rejected": "A: 3", "margin": 1.5},
    {"prompt": "Q: sky? ", "chosen": "A: blue", "rejected": "A: green", "margin": 0.5},
]
EXPECTED = [
    PreferencePair("Q: 1+1? ", "A: 2", "A: 3", 1.5),
    PreferencePair("Q: sky? ", "A: blue", "A: green", 0.5),
]


def write_pairs(path, n=48, seed=0):
    """Synthetic preferences a model can learn: the answer with more '!' wins."""
    rng = np.random.default_rng(seed)
    words = ["good", "fine", "ok", "nice", "meh", "sure", "well"]
    with open(path, "w") as f:
        for _ in range(n):
            body = " ".join(rng.choice(words, size=rng.integers(1, 4)))
            k = int(rng.integers(0, 3))
            f.write(
                json.dumps(
                    {
                        "prompt": "Q:",
                        "chosen": f" {body}" + "!" * (k + 1),
                        "rejected": f" {body}" + "!" * k + ".",
                        "margin": 1.0,
                    }
                )
                + "\n"
            )
    return str(path)


def make_run(tmp_path, **train):
    """MODEL trained on write_pairs' data (byte tokenizer, 12 steps); `train` overrides TrainConfig fields."""
    data = write_pairs(tmp_path / "pairs.jsonl")
    defaults = dict(
        data=data,
        eval_data=data,
        tokenizer="byte",
        seq_len=32,
        batch_size=8,
        max_steps=12,
        warmup_steps=2,
        lr_decay_steps=12,
        learning_rate=3e-3,
        min_lr=3e-4,
        checkpoint_every=4,
        eval_every=6,
        log_every=100,
        keep_checkpoints=2,
    )
    return RunConfig(MODEL, TrainConfig(**{**defaults, **train}))


def weights(run_dir):
    """The exported weights of a finished run: {torchref state_dict key: array}."""
    return load_safetensors(run_dir / "model.safetensors")[0]
