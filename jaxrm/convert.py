"""Weights between jaxrm and the torch state_dict of torchref.RewardModel.

One explicit rename table, generated from num_layer; strict key-set and shape checks.
Rules: Linear weight (out, in) <-> kernel (in, out) transposed; LayerNorm weight <-> scale;
Embedding weight <-> embedding.
"""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrm.checkpoint import CheckpointError, load_safetensors, save_safetensors
from jaxrm.config import INIT_STD, ModelConfig
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
        value = (
            value.detach().cpu().float().numpy()
            if value.is_floating_point()
            else value.detach().cpu().numpy()
        )
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
    flat = dict(nnx.to_flat_state(state))
    for key, (path, transpose) in table.items():
        value = _to_numpy(state_dict[key])
        value = value.T if transpose else value
        expected = flat[path].shape
        if value.shape != expected:
            shown = value.T.shape if transpose else value.shape
            raise ConversionError(
                f"state_dict[{key!r}] has shape {tuple(shown)}, the config needs "
                f"{tuple(expected[::-1]) if transpose else tuple(expected)}"
            )
        flat[path].set_value(jnp.array(value, jnp.float32))  # a copy: never alias the caller's buffers
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def to_torch_state_dict(model: RewardModel) -> dict[str, np.ndarray]:
    """The torchref state_dict (keys in torchref's order) as float32 numpy arrays."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    table = rename_table(model.config.num_layer)
    _check_keys({path for path, _ in table.values()}, flat, "model state")
    out = {}
    for key, (path, transpose) in table.items():
        value = np.asarray(flat[path][...], np.float32)
        out[key] = np.array(value.T if transpose else value, order="C")  # a writable copy
    return out


# ============================================================================= interop
# HF GPT-2 (transformers' GPT2Model / GPT2LMHeadModel / GPT2ForSequenceClassification), nanoGPT
# checkpoints and torchref state_dicts in; a GPT2ForSequenceClassification directory out.
# Layouts: HF's Conv1D weight is (in, out) = our kernel; torch Linear (torchref, nanoGPT) is
# (out, in). Everything is first turned into a torchref-keyed state_dict, then loaded with
# from_torch_state_dict (strict key and shape checks).

_HF_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of old checkpoints
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def _is_conv1d_weight(key: str) -> bool:
    """h.{i}.attn.c_attn.weight and the other weights HF GPT-2 stores as Conv1D (in, out)."""
    parts = key.split(".")
    return len(parts) == 5 and parts[0] == "h" and ".".join(parts[2:4]) in _CONV1D and parts[4] == "weight"


def torch_load_weights_only(path):
    """torch.load(path, weights_only=True): tensors and plain containers only. A pickle that would
    import or call anything else is refused with a ConversionError (nothing of it runs)."""
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"{path}: reading a torch pickle needs torch (pip install torch), or convert it to .safetensors"
        ) from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for anything that is not plain weights
        first = str(e).splitlines()[0] if str(e) else ""
        if "weights_only" in str(e):  # torch's advice to load with weights_only=False: never for jaxrm
            first = "it is damaged, or a pickle that would import or call code"
        raise ConversionError(
            f"{path}: refused to load: not a plain weights file that "
            f"torch.load(weights_only=True) accepts ({type(e).__name__}: {first})"
        ) from None


def _strip_prefix(state_dict: dict, prefixes) -> dict:
    out = {}
    for key, value in state_dict.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _fresh_head(d_model: int, seed: int) -> np.ndarray:
    """A reward head as torchref initializes it: normal(0, INIT_STD), shape (1, d_model)."""
    return (np.random.default_rng(seed).standard_normal((1, d_model)) * INIT_STD).astype(np.float32)


def _apply_overrides(base: ModelConfig, overrides: dict, source: str) -> ModelConfig:
    """base (from a checkpoint) with user overrides; architecture changes the weights cannot
    follow are errors that say what to change."""
    unknown = sorted(set(overrides) - set(ModelConfig.__dataclass_fields__))
    if unknown:
        raise ConversionError(f"unknown ModelConfig fields {unknown}")
    fixed = ("vocab_size", "d_model", "num_heads", "dff", "num_layer")
    for name in fixed:
        if name in overrides and overrides[name] != getattr(base, name):
            hint = (
                " (use a tokenizer whose vocabulary fits, or resize the embedding before converting)"
                if name == "vocab_size"
                else ""
            )
            raise ConversionError(
                f"{source} has {name}={getattr(base, name)}, but {name}={overrides[name]} "
                f"was asked for: remove the {name} override{hint}"
            )
    block = overrides.get("block_size", base.block_size)
    if block > base.block_size:
        raise ConversionError(
            f"{source} has block_size (n_positions)={base.block_size}: its position "
            f"embedding cannot serve block_size={block}; set block_size <= {base.block_size}"
        )
    return base.replace(**overrides)


def _finish(config: ModelConfig, sd: dict, source: str) -> RewardModel:
    """Crop wpe to config.block_size and load the torchref-keyed sd."""
    sd = dict(sd)
    wpe = _to_numpy(sd["wpe.weight"])
    sd["wpe.weight"] = wpe[: config.block_size]  # nanoGPT's crop_block_size: the first positions
    try:
        return from_torch_state_dict(config, sd)
    except ConversionError as e:
        raise ConversionError(f"{source}: {e}") from None


def hf_gpt2_config(hf: dict, source: str = "config.json", **overrides) -> ModelConfig:
    """A ModelConfig from a transformers GPT2Config dict."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ConversionError(f"{source}: model_type {hf.get('model_type')!r} is not 'gpt2'")
    act = hf.get("activation_function", "gelu_new")
    if act not in HF_ACTIVATIONS:
        raise ConversionError(
            f"{source}: activation_function {act!r} is not supported; supported: {sorted(HF_ACTIVATIONS)}"
        )
    for key, ok in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
    ):
        if hf.get(key, ok) != ok:
            raise ConversionError(f"{source}: {key}={hf[key]!r} is not supported (jaxrm computes {key}={ok})")
    try:
        n_embd = hf["n_embd"]
        base = ModelConfig(
            vocab_size=hf["vocab_size"],
            d_model=n_embd,
            block_size=hf["n_positions"],
            num_heads=hf["n_head"],
            num_layer=hf["n_layer"],
            dff=hf.get("n_inner") or 4 * n_embd,
            embed_pdrop=hf.get("embd_pdrop", 0.1),
            attn_pdrop=hf.get("attn_pdrop", 0.1),
            resid_pdrop=hf.get("resid_pdrop", 0.1),
            dropout=hf.get("resid_pdrop", 0.1),
            activation=HF_ACTIVATIONS[act],
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        )
    except KeyError as e:
        raise ConversionError(f"{source}: missing key {e.args[0]!r}; keys found: {sorted(hf)}") from None
    return _apply_overrides(base, overrides, source)


def hf_state_dict_to_torchref(
    sd: dict, config: ModelConfig, *, seed: int = 0, source: str = "checkpoint"
) -> dict:
    """HF GPT-2 keys (with or without "transformer.") -> torchref keys; LM head and mask buffers
    dropped; `score.weight` becomes the reward head, else a fresh normal(0, INIT_STD) head."""
    sd = _strip_prefix(sd, ("transformer.",))
    out = {}
    for key, value in sd.items():
        if key == "lm_head.weight" or key.endswith(_HF_IGNORED_SUFFIXES):
            continue
        if key == "score.weight":
            value = _to_numpy(value)
            if value.shape[0] != 1:
                raise ConversionError(
                    f"{source}: score.weight has shape {value.shape}; a reward model "
                    f"needs num_labels=1, i.e. shape (1, {config.d_model})"
                )
            out["reward_head.weight"] = value
            continue
        if _is_conv1d_weight(key):
            value = _to_numpy(value).T  # Conv1D (in, out) -> Linear (out, in)
        out[key] = value
    out.setdefault("reward_head.weight", _fresh_head(config.d_model, seed))
    return out


def _read_hf_weights(path):
    st, pt = path / "model.safetensors", path / "pytorch_model.bin"
    if st.is_file():
        try:
            return load_safetensors(st)[0], st
        except CheckpointError as e:
            raise ConversionError(str(e)) from None
    if pt.is_file():
        return torch_load_weights_only(pt), pt
    if list(pathlib.Path(path).glob("*.safetensors.index.json")):
        raise ConversionError(
            f"{path}: sharded checkpoints are not supported; merge the shards into one model.safetensors"
        )
    raise ConversionError(f"{path}: no model.safetensors or pytorch_model.bin")


def from_hf_gpt2(path, *, seed: int = 0, **config_overrides) -> RewardModel:
    """A RewardModel from a local transformers GPT-2 directory (config.json + model.safetensors or
    pytorch_model.bin, the latter only through torch.load(weights_only=True)).

    The architecture comes from config.json (activation gelu_new -> "gelu_tanh"); overrides may
    change dropout, dtype, layer_norm_eps or crop block_size. The LM head is dropped; the reward
    head is `score.weight` of a GPT2ForSequenceClassification, else freshly initialized
    (normal INIT_STD, `seed`)."""
    path = pathlib.Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ConversionError(f"{path}: no config.json; expected a transformers GPT-2 directory")
    try:
        hf = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{cfg_path}: malformed JSON ({e.msg})") from None
    config = hf_gpt2_config(hf, str(cfg_path), **config_overrides)
    sd, weights = _read_hf_weights(path)
    base = hf_gpt2_config(hf, str(cfg_path))
    return _finish(config, hf_state_dict_to_torchref(sd, base, seed=seed, source=str(weights)), str(weights))


def from_nanogpt(ckpt, *, seed: int = 0, source: str = "ckpt.pt", **config_overrides) -> RewardModel:
    """A RewardModel from a nanoGPT checkpoint dict ({"model": state_dict, "model_args": {...}}),
    or a path to its ckpt.pt (loaded with weights_only=True). Keys may carry torch.compile's
    "_orig_mod." prefix; `lm_head` and `attn.bias` buffers are dropped; bias=False models get
    zero biases (the same function); the reward head is freshly initialized. nanoGPT's GELU is
    the exact one, its LayerNorm eps 1e-5."""
    if isinstance(ckpt, (str, pathlib.Path)):
        source = str(ckpt)
        ckpt = torch_load_weights_only(ckpt)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ConversionError(
            f"{source}: not a nanoGPT checkpoint (needs 'model' and 'model_args'; found {found})"
        )
    args = ckpt["model_args"]
    try:
        n_embd = int(args["n_embd"])
        base = ModelConfig(
            vocab_size=int(args["vocab_size"]),
            d_model=n_embd,
            block_size=int(args["block_size"]),
            num_heads=int(args["n_head"]),
            num_layer=int(args["n_layer"]),
            dff=4 * n_embd,
            embed_pdrop=float(args.get("dropout", 0.0)),
            attn_pdrop=float(args.get("dropout", 0.0)),
            resid_pdrop=float(args.get("dropout", 0.0)),
            dropout=float(args.get("dropout", 0.0)),
        )
    except KeyError as e:
        raise ConversionError(f"{source}: model_args has no {e.args[0]!r}; found {sorted(args)}") from None
    config = _apply_overrides(base, config_overrides, source)
    sd = _strip_prefix(ckpt["model"], ("_orig_mod.", "transformer."))
    # h.{i}.attn.bias is nanoGPT's causal-mask buffer (non-flash attention), not a parameter
    sd = {k: v for k, v in sd.items() if k != "lm_head.weight" and not k.endswith(".attn.bias")}
    if not args.get("bias", True):  # nanoGPT bias=False: LayerNorm and Linear without bias = zero bias
        for key, (_, _) in rename_table(base.num_layer).items():
            if key.endswith(".bias") and key not in sd:
                width = {"attn.c_attn": 3 * n_embd, "mlp.c_fc": base.dff}.get(
                    ".".join(key.split(".")[2:4]), n_embd
                )
                sd[key] = np.zeros((width,), np.float32)
    sd["reward_head.weight"] = _fresh_head(base.d_model, seed)
    return _finish(config, sd, source)


def load_init_weights(path, model_config: ModelConfig | None = None, *, seed: int = 0, **config_overrides):
    """Initial weights for `jaxrm train --init PATH`, by what PATH is:
    - a directory with a GPT-2 config.json (transformers): from_hf_gpt2;
    - a .pt/.pth/.bin holding a nanoGPT checkpoint ({"model", "model_args"}): from_nanogpt;
    - a .safetensors / .pt state_dict with torchref's keys: from_torch_state_dict(model_config).
    Torch pickles are only read with weights_only=True. Returns a RewardModel whose config is the
    checkpoint's (HF, nanoGPT) or model_config (torchref)."""
    p = pathlib.Path(path)
    if p.is_dir():
        cfg = p / "config.json"
        if cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "gpt2":
            return from_hf_gpt2(p, seed=seed, **config_overrides)
        raise ConversionError(f"{p}: not a transformers GPT-2 directory (config.json with model_type 'gpt2')")
    if not p.is_file():
        raise ConversionError(f"{p}: no such file or directory")
    if p.suffix == ".safetensors":
        try:
            sd = load_safetensors(p)[0]
        except CheckpointError as e:
            raise ConversionError(str(e)) from None
    elif p.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        sd = torch_load_weights_only(p)
        if isinstance(sd, dict) and "model" in sd and "model_args" in sd:
            return from_nanogpt(sd, seed=seed, source=str(p), **config_overrides)
    else:
        raise ConversionError(
            f"{p}: expected a transformers GPT-2 directory, .safetensors, or a "
            f".pt/.pth/.bin state_dict or nanoGPT ckpt.pt"
        )
    if not isinstance(sd, dict):
        raise ConversionError(f"{p}: expected a state_dict (a dict of tensors), got {type(sd).__name__}")
    if "reward_head.weight" not in sd:
        raise ConversionError(
            f"{p}: not a torchref state_dict (no 'reward_head.weight'); for HF GPT-2 "
            f"weights pass the directory with its config.json"
        )
    if model_config is None:
        raise ConversionError(f"{p}: a torchref state_dict needs the model config")
    try:
        return from_torch_state_dict(model_config.replace(**config_overrides), sd)
    except ConversionError as e:
        raise ConversionError(f"{p}: {e}") from None


def hf_sequence_classification_config(config: ModelConfig) -> dict:
    """transformers GPT2Config (as a dict) of a GPT2ForSequenceClassification with our shapes."""
    act = {"gelu": "gelu", "gelu_tanh": "gelu_new"}[config.activation]
    return {
        "architectures": ["GPT2ForSequenceClassification"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.d_model,
        "n_layer": config.num_layer,
        "n_head": config.num_heads,
        "n_inner": config.dff,
        "activation_function": act,
        "layer_norm_epsilon": config.layer_norm_eps,
        "embd_pdrop": config.embed_pdrop,
        "attn_pdrop": config.attn_pdrop,
        "resid_pdrop": config.resid_pdrop,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "num_labels": 1,
        "id2label": {"0": "LABEL_0"},
        "label2id": {"LABEL_0": 0},
        "pad_token_id": config.pad_id,
        "bos_token_id": config.pad_id,
        "eos_token_id": config.pad_id,
        "tie_word_embeddings": False,
        "use_cache": False,
        "torch_dtype": "float32",
    }


def export_hf_sequence_classification(model: RewardModel, out_dir, normalization=None) -> pathlib.Path:
    """Write out_dir/config.json + out_dir/model.safetensors: a transformers
    GPT2ForSequenceClassification (num_labels=1, pad_token_id = the model's PAD id, activation
    "gelu" or "gelu_new" as the model's) whose score at the last non-pad token is jaxrm's end
    score. Keys are "transformer.*" (Conv1D (in, out) layout) and "score.weight".
    `normalization` (a jaxrm.score.Normalization) adds OpenRLHF's normalize_reward, mean and std
    to config.json; transformers ignores them, OpenRLHF's reward model applies (r - mean) / std."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = to_torch_state_dict(model)
    hf = {}
    for key, value in sd.items():
        if key == "reward_head.weight":
            hf["score.weight"] = value  # (1, d_model), Linear layout in both
            continue
        if _is_conv1d_weight(key):
            value = value.T  # Linear (out, in) -> Conv1D (in, out)
        hf["transformer." + key] = value
    save_safetensors(hf, out / "model.safetensors", metadata={"format": "pt"})
    config = hf_sequence_classification_config(model.config)
    if normalization is not None:
        config.update(normalize_reward=True, mean=normalization.mean, std=normalization.std)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
