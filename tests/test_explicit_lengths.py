"""TrainConfig.lengths="explicit": sequence ends from each row's true length, so an end-of-text id
(= GPT-2's PAD 50256) inside a prompt does not cut the sequence. The default ("first_pad", the
original) is unchanged: the first PAD ends a sequence and a PAD inside a text is refused."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from jaxrm import cli
from jaxrm import sharding as shd
from jaxrm.config import ModelConfig, RunConfig, TrainConfig
from jaxrm.data import BatchIterator, encode_pairs, eval_batches
from jaxrm.evaluate import evaluate
from jaxrm.formats import DataError, load_pairs
from jaxrm.loss import pairwise_loss
from jaxrm.model import RewardModel
from jaxrm.state import init_train_state, split_model
from jaxrm.step import make_eval_step, make_train_step, micro_batches
from jaxrm.tokenizer import GPT2Tokenizer
from tests.conftest import MODEL as BYTE_MODEL
from tests.conftest import write_pairs

GPT2 = GPT2Tokenizer()
EOT = GPT2.eot_id  # 50256 = the PAD id of a vocab_size=50257 model
MODEL = ModelConfig(
    vocab_size=50257,
    d_model=32,
    block_size=32,
    num_heads=4,
    dff=64,
    num_layer=1,
    embed_pdrop=0.0,
    attn_pdrop=0.0,
    resid_pdrop=0.0,
    dropout=0.0,
)
EXPLICIT = TrainConfig(batch_size=4, max_steps=4, warmup_steps=1, learning_rate=3e-3, lengths="explicit")


def gpt2_rows(n=8):
    """Pre-tokenized GPT-2 pairs whose shared prompt holds <|endoftext|> between two documents
    (as data tokenized with the HF GPT-2 tokenizer has); answers of different lengths."""
    rows = []
    for i in range(n):
        prompt = (
            GPT2.encode(f"Document {i}: the day was {'sunny' if i % 2 else 'grey'}.")
            + [EOT]
            + GPT2.encode(" Question: was it nice? Answer:")
        )
        rows.append(
            {
                "input_ids_chosen": prompt + GPT2.encode(" yes" * (1 + i % 3)),
                "input_ids_rejected": prompt + GPT2.encode(" no" * (1 + i % 2)),
            }
        )
    return rows


@pytest.fixture(scope="module")
def gpt2_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eot") / "eot_pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in gpt2_rows()))
    return path


def encode(path, lengths="explicit"):
    return encode_pairs(
        load_pairs(path),
        GPT2,
        seq_len=MODEL.block_size,
        pad_id=MODEL.pad_id,
        vocab_size=MODEL.vocab_size,
        lengths=lengths,
    )[0]


def fresh_model():
    """The fixture's weights, in arrays of its own (a train step donates the state it is given)."""
    return RewardModel(MODEL, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def model_and_params():
    model = fresh_model()
    return model, split_model(model)[1]


def test_encode_keeps_endoftext_inside_the_prompt_only_with_explicit_lengths(gpt2_file):
    rows = gpt2_rows()
    with pytest.raises(
        DataError,
        match=r"pair 0\): chosen contains the pad id 50256 at token \d+ inside the real "
        r"text .*--lengths=explicit",
    ):
        encode(gpt2_file, lengths="first_pad")  # the default: refused, as before
    data = encode(gpt2_file)
    assert len(data) == len(rows)
    assert data.chosen_lengths.tolist() == [len(r["input_ids_chosen"]) for r in rows]
    assert data.rejected_lengths.tolist() == [len(r["input_ids_rejected"]) for r in rows]
    for row, n, r in zip(data.chosen_ids, data.chosen_lengths, rows):
        assert row[:n].tolist() == r["input_ids_chosen"] and EOT in row[:n].tolist()
    batch = next(BatchIterator(data, 4, seed=0))
    assert batch["lengths"].shape == (8,) and batch["lengths"].dtype == np.int32


def true_end_scores(model, batch):
    rewards = np.asarray(model(batch["input_ids"], deterministic=True))  # (2B, T)
    return rewards[np.arange(len(rewards)), batch["lengths"] - 1]  # (2B,) at the true last token


def test_eval_end_scores_are_at_the_true_last_token(gpt2_file, model_and_params):
    model, params = model_and_params
    data = encode(gpt2_file)
    batch = next(eval_batches(data, 8))
    ends = true_end_scores(model, batch)
    out = jax.device_get(
        make_eval_step(MODEL, EXPLICIT)(params, shd.shard_batch(batch, None, 8, lengths=True))
    )
    np.testing.assert_allclose(out["chosen"], ends[:8], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out["rejected"], ends[8:], rtol=1e-6, atol=1e-7)
    assert not out["identical"].any()
    # the default on the same ids: the end-of-text in the prompt is the first PAD, so every
    # sequence ends there, before the answers differ: an empty loss span, NaN (why encode refuses it)
    default_step = make_eval_step(MODEL, dataclasses.replace(EXPLICIT, lengths="first_pad"))
    default = jax.device_get(default_step(params, shd.shard_batch(batch, None, 8, lengths=True)))
    rewards = np.asarray(model(batch["input_ids"], deterministic=True))
    first_pad = np.argmax(batch["input_ids"] == EOT, axis=1)
    np.testing.assert_allclose(default["chosen"], rewards[np.arange(8), first_pad[:8] - 1], rtol=1e-6)
    assert np.isnan(default["loss"]).all()
    # evaluate(): the same scores, all pairs counted
    result = evaluate(make_eval_step(MODEL, EXPLICIT), params, data, 8)
    assert result["pairs"] == 8 and result["accuracy"] == pytest.approx(np.mean(ends[:8] > ends[8:]))


def test_train_step_loss_and_scores_use_the_lengths(gpt2_file, model_and_params):
    model, params = model_and_params
    batch = next(BatchIterator(encode(gpt2_file), 4, seed=0))
    ends = true_end_scores(model, batch)
    rewards = model(batch["input_ids"], deterministic=True)
    expected = pairwise_loss(rewards, batch["input_ids"], MODEL.pad_id, lengths=batch["lengths"])
    state = init_train_state(MODEL, EXPLICIT, model=fresh_model())
    step = make_train_step(MODEL, EXPLICIT)
    _, metrics = step(state, shd.shard_batch(batch, None, 4, lengths=True))
    assert float(metrics["loss"]) == pytest.approx(float(expected.loss), rel=1e-6)
    assert float(metrics["chosen_mean"]) == pytest.approx(float(ends[:4].mean()), rel=1e-5)
    assert float(metrics["rejected_mean"]) == pytest.approx(float(ends[4:].mean()), rel=1e-5)
    assert float(metrics["loss"]) > 0.1  # the default would end every sequence inside the prompt: NaN
    with pytest.raises(ValueError, match='lengths="explicit" needs batches with "lengths"'):
        make_train_step(MODEL, EXPLICIT)(
            init_train_state(MODEL, EXPLICIT, model=fresh_model()), shd.shard_batch(batch, None, 4)
        )


def test_default_mode_is_unchanged_when_no_pad_is_inside_a_text():
    """On ordinary data the two modes compute the same steps; the default's batches carry no lengths."""
    import tempfile

    from jaxrm.tokenizer import ByteTokenizer

    with tempfile.TemporaryDirectory() as d:
        pairs = load_pairs(write_pairs(os.path.join(d, "p.jsonl")))
    data = encode_pairs(pairs, ByteTokenizer(), seq_len=32, pad_id=256, vocab_size=257)[0]
    model = BYTE_MODEL.replace(embed_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, dropout=0.0)
    results = {}
    for mode in ("first_pad", "explicit"):
        tc = TrainConfig(batch_size=8, max_steps=3, warmup_steps=1, learning_rate=3e-3, lengths=mode)
        state, step, batches = (
            init_train_state(model, tc, seed=0),
            make_train_step(model, tc),
            BatchIterator(data, 8, seed=0),
        )
        losses = []
        for _ in range(3):
            batch = shd.shard_batch(next(batches), None, 8, lengths=mode == "explicit")
            assert ("lengths" in batch) == (mode == "explicit")
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        results[mode] = losses, jax.device_get(state.params)
    np.testing.assert_allclose(results["explicit"][0], results["first_pad"][0], rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        results["explicit"][1],
        results["first_pad"][1],
    )


def test_grad_accumulation_with_lengths_equals_the_full_batch(gpt2_file, model_and_params):
    model, _ = model_and_params
    data = encode(gpt2_file)
    micro = micro_batches(shd.shard_batch(next(BatchIterator(data, 4, seed=0)), None, 4, lengths=True), 2)
    assert micro["lengths"].shape == (2, 4)
    for j in range(2):  # each micro-batch's lengths are those of its own rows
        ids, lengths = np.asarray(micro["input_ids"][j]), np.asarray(micro["lengths"][j])
        assert all(row[n - 1] != EOT and (n == ids.shape[1] or row[n] == EOT) for row, n in zip(ids, lengths))
    results = []
    for k in (1, 2):
        tc = dataclasses.replace(EXPLICIT, grad_accum_steps=k)
        state, step, batches = (
            init_train_state(MODEL, tc, model=fresh_model()),
            make_train_step(MODEL, tc),
            BatchIterator(data, 4, seed=0),
        )
        losses, norms = [], []
        for _ in range(3):
            state, metrics = step(state, shd.shard_batch(next(batches), None, 4, lengths=True))
            losses.append(float(metrics["loss"]))
            norms.append(float(metrics["grad_norm"]))
        results.append((losses, norms, jax.device_get(state.params)))
    (l1, n1, p1), (l2, n2, p2) = results
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    np.testing.assert_allclose(n2, n1, rtol=1e-5)  # the same gradients
    assert_same_params(p2, p1)


def assert_same_params(got, ref, rtol=1e-4):
    """Relative error per parameter, outside the parts whose gradient is 0 in exact arithmetic (the
    key bias, ln_f.bias: Adam turns their float noise into steps of ~lr; see parity_tests)."""
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(ref)):
        name = jax.tree_util.keystr(path)
        keep = np.ones(np.shape(b), bool)
        if "c_attn" in name and "bias" in name:
            keep[MODEL.d_model : 2 * MODEL.d_model] = False
        if "ln_f" in name and "bias" in name:
            continue
        error = np.linalg.norm(np.asarray(a)[keep] - np.asarray(b)[keep]) / np.linalg.norm(
            np.asarray(b)[keep]
        )
        assert error <= rtol, (name, error)


def test_lengths_do_not_recompile_the_steps(gpt2_file, model_and_params):
    model, params = model_and_params
    data = encode(gpt2_file)
    state, step = init_train_state(MODEL, EXPLICIT, model=fresh_model()), make_train_step(MODEL, EXPLICIT)
    batches = BatchIterator(data, 4, seed=0)
    seen = set()
    for _ in range(4):  # batches with other lengths, same shapes
        batch = next(batches)
        seen.add(tuple(batch["lengths"]))
        state, _ = step(state, shd.shard_batch(batch, None, 4, lengths=True))
    assert len(seen) > 1 and step._cache_size() == 1
    eval_step = make_eval_step(MODEL, EXPLICIT)
    evaluate(eval_step, params, data, 3)  # 3 batches, the last one filled up
    assert eval_step._cache_size() == 1


def test_cli_train_eval_lint_score_with_explicit_lengths(gpt2_file, tmp_path, capsys):
    args = [
        "train",
        "--preset",
        "tiny",
        "--data",
        str(gpt2_file),
        "--d_model=32",
        "--dff=64",
        "--num_layer=1",
        "--block_size=32",
        "--seq_len=32",
        "--max_steps=2",
        "--batch_size=4",
        "--eval_every=2",
        "--checkpoint_every=2",
        f"--eval_data={gpt2_file}",
    ]
    assert cli.main(args + ["--out", str(tmp_path / "default")]) == 2  # the default refuses, naming the pair
    assert "contains the pad id 50256" in capsys.readouterr().err
    out = tmp_path / "run"
    assert cli.main(args + ["--out", str(out), "--lengths=explicit"]) == 0
    assert "validation: pairwise accuracy" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["train"]["lengths"] == "explicit"
    assert cli.main(["eval", str(out), "--data", str(gpt2_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pairs"] == 8
    # lint: PAD inside a text is an error by default, a note with explicit lengths
    assert cli.main(["lint", str(gpt2_file), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["checks"]["pad_in_text"]["count"] == 8
    assert cli.main(["lint", str(gpt2_file), "--json", "--lengths", "explicit"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        report["errors"] == 0
        and report["trainable_pairs"] == 8
        and report["checks"]["pad_in_text"]["count"] == 8
    )
    # scoring: a sequence with <|endoftext|> inside is scored at its last token
    from jaxrm.rundir import load_model
    from jaxrm.score import score_ids

    run, model = load_model(out)
    ids = gpt2_rows(1)[0]["input_ids_chosen"]
    [score] = score_ids(model, run, [ids])
    padded = np.full((1, 32), EOT, np.int32)
    padded[0, : len(ids)] = ids
    assert score == pytest.approx(
        float(np.asarray(model(padded, deterministic=True))[0, len(ids) - 1]), rel=1e-5
    )
    default_run = RunConfig(run.model, dataclasses.replace(run.train, lengths="first_pad"))
    with pytest.raises(ValueError, match="reserves or lacks .*--lengths=explicit"):
        score_ids(model, default_run, [ids])


SHARDED = r"""
import jax, json, sys
jax.config.update("jax_default_matmul_precision", "highest")
import numpy as np
from jaxrm import sharding as shd
from jaxrm.config import ModelConfig, TrainConfig
from jaxrm.data import BatchIterator, EncodedPairs
from jaxrm.state import init_train_state
from jaxrm.step import make_train_step
model = ModelConfig(vocab_size=257, d_model=32, block_size=16, num_heads=4, dff=64, num_layer=1,
                    embed_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, dropout=0.0)
rng = np.random.default_rng(0)
n, T = 16, 16
chosen, rejected = np.full((n, T), 256, np.int32), np.full((n, T), 256, np.int32)
lc, lr = rng.integers(8, T + 1, n).astype(np.int32), rng.integers(8, T + 1, n).astype(np.int32)
for i in range(n):
    # PAD inside the prompt
    prompt = np.concatenate([rng.integers(0, 256, 2), [256], rng.integers(0, 256, 2)])
    chosen[i, :lc[i]] = np.concatenate([prompt, rng.integers(0, 256, lc[i] - 5)])
    rejected[i, :lr[i]] = np.concatenate([prompt, rng.integers(0, 256, lr[i] - 5)])
data = EncodedPairs(chosen, rejected, lc, lr, np.zeros(n, np.float32))
tc = TrainConfig(batch_size=8, max_steps=2, warmup_steps=1, learning_rate=3e-3, lengths="explicit")
result = {}
for name, mesh in (("one", None), ("mesh", shd.make_mesh(2, 4))):
    state = shd.shard_state(init_train_state(model, tc, seed=0), mesh)
    step, batches = make_train_step(model, tc, mesh), BatchIterator(data, 8, seed=0)
    losses = []
    for _ in range(2):
        batch = shd.shard_batch(next(batches), mesh, 8, lengths=True)
        if mesh is not None:
            assert batch["lengths"].shape == (2, 8) and len(batch["lengths"].sharding.device_set) == 8
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    result[name] = losses
json.dump(result, sys.stdout)
"""


def test_sharded_step_takes_lengths():
    """data=2 x fsdp=4 on 8 forced CPU devices, explicit lengths, PAD inside prompts: the same losses."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(np.isfinite(result["one"])) and result["one"][0] > 0
    np.testing.assert_allclose(result["mesh"], result["one"], rtol=1e-5)
