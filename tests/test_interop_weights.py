"""Weights in and out: transformers GPT-2, nanoGPT ckpt.pt, torchref state_dicts, and a
GPT2ForSequenceClassification export, checked against transformers itself (no download: every
model is built randomly here and saved to tmp_path)."""

import json
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from jaxrm import ModelConfig, RewardModel, convert
from jaxrm.convert import ConversionError

jax.config.update("jax_default_matmul_precision", "highest")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, T = 101, 24
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu": "gelu"}  # HF name -> jaxrm name


def hf_config(activation="gelu_new", **kw):
    base = dict(
        vocab_size=VOCAB,
        n_positions=T,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_inner=48,
        activation_function=activation,
        layer_norm_epsilon=1e-5,
    )
    return transformers.GPT2Config(**{**base, **kw})


def save_hf(tmp_path, cls_name="GPT2Model", activation="gelu_new", seed=0, **kw):
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(hf_config(activation, **kw)).eval()
    with torch.no_grad():  # non-trivial LayerNorm params and biases, so a dropped one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("mlp.c_fc.weight"):  # GELU inputs of order 1: tanh vs erf differ visibly
                p.mul_(20.0)
    path = tmp_path / f"{cls_name}-{activation}"
    model.save_pretrained(path)
    return model, path


def random_ids(seed=0, B=3, length=T):
    return np.random.default_rng(seed).integers(0, VOCAB - 1, size=(B, length)).astype(np.int32)


@pytest.mark.parametrize("hf_act", ["gelu_new", "gelu"])
def test_hf_gpt2_hidden_states_match_transformers(tmp_path, hf_act):
    hf, path = save_hf(tmp_path, activation=hf_act)
    model = convert.from_hf_gpt2(path)
    assert model.config.activation == ACTIVATIONS[hf_act]
    assert (model.config.d_model, model.config.dff, model.config.block_size) == (32, 48, T)
    ids = random_ids()
    ours = np.asarray(model.hidden_states(ids))
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    head = np.asarray(model.reward_head.kernel[...])  # fresh: normal(0, 0.02)
    assert head.shape == (32, 1) and 0.005 < head.std() < 0.05


def test_wrong_activation_would_be_caught(tmp_path):
    """The check above is sharp enough to see tanh vs erf GELU."""
    hf, path = save_hf(tmp_path, activation="gelu_new")
    model = convert.from_hf_gpt2(path)
    wrong = convert.from_torch_state_dict(
        model.config.replace(activation="gelu"), convert.to_torch_state_dict(model)
    )
    ids = random_ids()
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    assert np.abs(np.asarray(wrong.hidden_states(ids)) - theirs).max() > 1e-5


def test_lm_head_checkpoint_and_pytorch_model_bin(tmp_path):
    hf, path = save_hf(tmp_path, cls_name="GPT2LMHeadModel")
    ids = random_ids(1)
    with torch.no_grad():
        theirs = hf.transformer(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(convert.from_hf_gpt2(path).hidden_states(ids)), theirs, atol=1e-5)
    # the same weights as a pickled state_dict with old-style mask buffers and an explicit lm_head
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((path / "config.json").read_text())
    sd = dict(hf.state_dict())
    sd["lm_head.weight"] = hf.transformer.wte.weight.detach().clone()
    sd["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, T, T))
    sd["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, bin_dir / "pytorch_model.bin")
    np.testing.assert_allclose(
        np.asarray(convert.from_hf_gpt2(bin_dir).hidden_states(ids)), theirs, atol=1e-5
    )


@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu"])
def test_seq_cls_export_scores_match_transformers(tmp_path, activation):
    config = ModelConfig(
        vocab_size=VOCAB, d_model=32, block_size=T, num_heads=4, dff=48, num_layer=2, activation=activation
    )
    model = RewardModel(config, rngs=nnx.Rngs(3))
    out = convert.export_hf_sequence_classification(model, tmp_path / "seqcls")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["activation_function"] == {"gelu": "gelu", "gelu_tanh": "gelu_new"}[activation]
    assert cfg["pad_token_id"] == config.pad_id and cfg["architectures"] == ["GPT2ForSequenceClassification"]
    hf, info = transformers.GPT2ForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys")
    assert hf.config.num_labels == 1
    hf.eval()
    ids = random_ids(2, B=4)
    lengths = [T, 17, 5, 1]
    for row, n in enumerate(lengths):
        ids[row, n:] = config.pad_id
    rewards = np.asarray(model(ids))
    ours = rewards[np.arange(4), np.array(lengths) - 1]  # the end score: reward at the last real token
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids).long()).logits[:, 0].numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)
    assert np.ptp(ours) > 1e-3  # the scores differ per row, so a wrong position would show
    # back in: score.weight becomes the reward head, the function is unchanged
    back = convert.from_hf_gpt2(out)
    assert back.config == config.replace(dropout=config.resid_pdrop)
    np.testing.assert_array_equal(np.asarray(back(ids)), rewards)


def test_config_mismatches_say_what_to_change(tmp_path):
    hf, path = save_hf(tmp_path)
    with pytest.raises(ConversionError, match="vocab_size=101.*remove the vocab_size override"):
        convert.from_hf_gpt2(path, vocab_size=50257)
    with pytest.raises(ConversionError, match=f"set block_size <= {T}"):
        convert.from_hf_gpt2(path, block_size=T + 8)
    small = convert.from_hf_gpt2(path, block_size=8, dropout=0.0)  # a crop is fine
    ids = random_ids(B=2, length=8)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(small.hidden_states(ids)), theirs, atol=1e-5)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(
        json.dumps({**json.loads((path / "config.json").read_text()), "activation_function": "relu"})
    )
    with pytest.raises(ConversionError, match="activation_function 'relu' is not supported"):
        convert.from_hf_gpt2(bad)
    empty = tmp_path / "noweights"
    empty.mkdir()
    (empty / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ConversionError, match="no model.safetensors or pytorch_model.bin"):
        convert.from_hf_gpt2(empty)


# ----------------------------------------------------------------------------- nanoGPT / torchref

NANO_CONFIG = ModelConfig(
    vocab_size=VOCAB,
    d_model=32,
    block_size=T,
    num_heads=4,
    dff=128,
    num_layer=2,
    embed_pdrop=0.0,
    attn_pdrop=0.0,
    resid_pdrop=0.0,
    dropout=0.0,
)


def nanogpt_ckpt(model, bias=True):
    """What nanoGPT's train.py saves, with torch.compile's prefix and the mask buffers."""
    sd = convert.to_torch_state_dict(model)
    del sd["reward_head.weight"]
    if not bias:
        sd = {k: v for k, v in sd.items() if not k.endswith(".bias")}
    state = {f"_orig_mod.transformer.{k}": torch.from_numpy(v) for k, v in sd.items()}
    state["_orig_mod.lm_head.weight"] = torch.from_numpy(sd["wte.weight"])
    for i in range(model.config.num_layer):
        state[f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, T, T))
    args = dict(n_layer=2, n_head=4, n_embd=32, block_size=T, bias=bias, vocab_size=VOCAB, dropout=0.0)
    return {
        "model": state,
        "model_args": args,
        "iter_num": 100,
        "best_val_loss": torch.tensor(2.5),
        "config": {"dataset": "shakespeare_char"},
    }


@pytest.mark.parametrize("bias", [True, False])
def test_nanogpt_ckpt(tmp_path, bias):
    model = RewardModel(NANO_CONFIG, rngs=nnx.Rngs(5))
    if not bias:  # a bias=False nanoGPT model computes what zero biases compute
        sd = {
            k: (np.zeros_like(v) if k.endswith(".bias") else v)
            for k, v in convert.to_torch_state_dict(model).items()
        }
        model = convert.from_torch_state_dict(NANO_CONFIG, sd)
    torch.save(nanogpt_ckpt(model, bias), tmp_path / "ckpt.pt")
    loaded = convert.load_init_weights(tmp_path / "ckpt.pt")
    assert loaded.config == NANO_CONFIG
    ids = random_ids(4)
    np.testing.assert_array_equal(np.asarray(loaded.hidden_states(ids)), np.asarray(model.hidden_states(ids)))


def test_torchref_state_dicts(tmp_path):
    from jaxrm.checkpoint import save_safetensors

    model = RewardModel(NANO_CONFIG, rngs=nnx.Rngs(6))
    sd = convert.to_torch_state_dict(model)
    save_safetensors(sd, tmp_path / "w.safetensors")
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "w.pt")
    ids = random_ids(5)
    for name in ("w.safetensors", "w.pt"):
        loaded = convert.load_init_weights(tmp_path / name, NANO_CONFIG)
        np.testing.assert_array_equal(np.asarray(loaded(ids)), np.asarray(model(ids)))
    del sd["h.1.mlp.c_fc.bias"]
    save_safetensors(sd, tmp_path / "bad.safetensors")
    with pytest.raises(ConversionError, match=r"bad.safetensors.*missing keys \['h.1.mlp.c_fc.bias'\]"):
        convert.load_init_weights(tmp_path / "bad.safetensors", NANO_CONFIG)


# ----------------------------------------------------------------------------- pickles that run code


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling calls open(marker, "w"): creates the marker file
        return (open, (self.marker, "w"))


def _evil_files(tmp_path, marker):
    raw = pickle.dumps({"model": _Evil(str(marker)), "model_args": {}}, protocol=2)
    (tmp_path / "evil.pt").write_bytes(raw)  # a plain pickle
    torch.save({"wte.weight": _Evil(str(marker))}, tmp_path / "evil_zip.pt")  # torch's zip format
    (tmp_path / "ckpt.pt").write_bytes(raw)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(hf_config().to_json_string())
    (hf_dir / "pytorch_model.bin").write_bytes(raw)
    return hf_dir


def test_pickles_that_run_code_are_refused_everywhere(tmp_path):
    from jaxrm.cli import main

    marker = tmp_path / "PWNED"
    hf_dir = _evil_files(tmp_path, marker)
    # the crafted file is real: a plain unpickle creates the marker (in a subprocess)
    subprocess.run(
        [sys.executable, "-c", f"import pickle; pickle.load(open({str(tmp_path / 'evil.pt')!r}, 'rb'))"],
        check=True,
    )
    assert marker.exists()
    marker.unlink()
    loaders = [
        lambda: convert.load_init_weights(tmp_path / "evil.pt", NANO_CONFIG),
        lambda: convert.load_init_weights(tmp_path / "evil_zip.pt", NANO_CONFIG),
        lambda: convert.from_nanogpt(tmp_path / "ckpt.pt"),
        lambda: convert.from_hf_gpt2(hf_dir),
        lambda: convert.load_init_weights(hf_dir),
    ]
    for load in loaders:
        with pytest.raises(ConversionError, match="refused to load"):
            load()
        assert not marker.exists()
    assert (
        main(
            ["train", "--preset", "tiny", "--init", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "run")]
        )
        == 2
    )
    assert not marker.exists()


def test_cli_train_init_from_hf_and_convert_to_hf(tmp_path, capsys):
    """`jaxrm train --init HF_DIR` takes the checkpoint's architecture; `jaxrm convert --to
    hf-seq-cls` writes a directory transformers loads with the trained head."""
    from jaxrm.cli import main

    hf, path = save_hf(tmp_path, vocab_size=257, n_positions=32)
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Q{i}: ", "chosen": " yes good", "rejected": " no bad"}) + "\n"
            for i in range(8)
        )
    )
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--preset",
                "tiny",
                "--data",
                str(data),
                "--init",
                str(path),
                "--out",
                str(out),
                "--tokenizer=byte",
                "--seq_len=32",
                "--max_steps=2",
                "--batch_size=4",
                "--dropout=0.0",
                "--eval_every=2",
                "--checkpoint_every=2",
            ]
        )
        == 0
    )
    saved = json.loads((out / "config.json").read_text())["model"]
    assert (saved["d_model"], saved["dff"], saved["activation"], saved["dropout"]) == (
        32,
        48,
        "gelu_tanh",
        0.0,
    )
    assert main(["convert", str(out), str(tmp_path / "hfout"), "--to", "hf-seq-cls"]) == 0
    from jaxrm.rundir import load_model

    _, trained = load_model(out)
    seqcls = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "hfout").eval()
    ids = random_ids(7, B=2, length=10)
    with torch.no_grad():
        theirs = seqcls(torch.from_numpy(ids).long()).logits[:, 0].numpy()
    np.testing.assert_allclose(theirs, np.asarray(trained(ids))[:, -1], atol=1e-5)
