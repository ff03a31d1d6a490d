"""jaxrm.convert: strict key and shape checks, exact round trips (no torch needed)."""

import numpy as np
import pytest
from flax import nnx

from jaxrm import ModelConfig, RewardModel, convert
from jaxrm.convert import ConversionError

CONFIG = ModelConfig(vocab_size=97, d_model=32, block_size=16, num_heads=4, dff=64, num_layer=2)


def state_dict(config=CONFIG, seed=0):
    return convert.to_torch_state_dict(RewardModel(config, rngs=nnx.Rngs(seed)))


def test_keys_are_torchrefs_in_order():
    keys = list(state_dict())
    assert keys[:4] == ["wte.weight", "wpe.weight", "h.0.ln_1.weight", "h.0.ln_1.bias"]
    assert keys[-3:] == ["reward_head.weight", "ln_f.weight", "ln_f.bias"]
    assert len(keys) == 2 + 12 * CONFIG.num_layer + 3
    sd = state_dict()
    assert sd["h.1.attn.c_attn.weight"].shape == (3 * 32, 32)  # torch Linear layout (out, in)
    assert sd["reward_head.weight"].shape == (1, 32)


def test_round_trip_is_exact():
    sd = state_dict(seed=1)
    back = convert.to_torch_state_dict(convert.from_torch_state_dict(CONFIG, sd))
    assert all(np.array_equal(back[k], sd[k]) for k in sd)


def test_missing_key_is_named():
    sd = state_dict()
    del sd["h.1.mlp.c_fc.bias"]
    with pytest.raises(ConversionError, match=r"missing keys \['h.1.mlp.c_fc.bias'\]"):
        convert.from_torch_state_dict(CONFIG, sd)


def test_unexpected_key_is_named():
    sd = state_dict()
    sd["lm_head.weight"] = np.zeros((97, 32), np.float32)
    with pytest.raises(ConversionError, match=r"unexpected keys \['lm_head.weight'\]"):
        convert.from_torch_state_dict(CONFIG, sd)


def test_misshaped_key_is_named_with_both_shapes():
    sd = state_dict()
    sd["h.0.attn.c_proj.weight"] = np.zeros((32, 16), np.float32)
    with pytest.raises(ConversionError, match=r"h.0.attn.c_proj.weight.*\(32, 16\).*\(32, 32\)"):
        convert.from_torch_state_dict(CONFIG, sd)


def test_state_dict_from_another_config_is_refused():
    deeper = state_dict(CONFIG.replace(num_layer=3))
    with pytest.raises(ConversionError, match=r"unexpected keys \['h.2"):
        convert.from_torch_state_dict(CONFIG, deeper)
    wider_vocab = state_dict(CONFIG.replace(vocab_size=128))
    with pytest.raises(ConversionError, match=r"wte.weight.*\(128, 32\).*\(97, 32\)"):
        convert.from_torch_state_dict(CONFIG, wider_vocab)
