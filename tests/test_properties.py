"""Bad data at scale (issue 7): hypothesis feeds random pairs to the file loaders, the encoder and
pairwise_loss. Every input is either processed with results equal to a plain-numpy reference
written here from the original span loss (DESIGN.md, seed_reward_model.md), or rejected with a
jaxrm error (DataError / PairBatchError) whose message says what is wrong: never an unrelated
exception, a hang, a NaN or a silently wrong value.

Deterministic (derandomize=True, no example database) and bounded; jit sees a few fixed shapes.
"""

import csv
import gzip
import io
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from jaxrm.data import encode_pairs, eval_batches
from jaxrm.formats import CHAT_TEMPLATE, ROLE_NAMES, DataError, PreferencePair, load_pairs
from jaxrm.loss import PairBatchError, pairwise_loss, validate_pair_batch
from jaxrm.tokenizer import ByteTokenizer, GPT2Tokenizer

SETTINGS = dict(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def logsigmoid(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


# ----------------------------------------------------------------------------- the reference


class Undefined(Exception):
    """The original has no value here (it would read rewards[-1] or take the mean of an empty span)."""


def first_pad(row, pad):
    hits = np.flatnonzero(row == pad)
    return int(hits[0]) if len(hits) else len(row)


def reference_loss(ids, rewards, pad, *, loss_type="span", normalize_by="pairs", margins=None, lengths=None):
    """One pair at a time, as the original: rows 0..bs-1 chosen, bs..2bs-1 rejected; end = first PAD
    (or T, or the explicit length); identical pairs add no term but count in the denominator bs;
    term = mean over t in [div, max(c_end, r_end)) of -logsigmoid(c[t] - r[t] - margin)."""
    ids, rewards = np.asarray(ids), np.asarray(rewards, np.float64)
    bs = len(ids) // 2
    margins = np.zeros(bs) if margins is None else np.asarray(margins, np.float64)
    ends = [first_pad(row, pad) for row in ids] if lengths is None else [int(n) for n in lengths]
    out = {"terms": [], "chosen": [], "rejected": [], "identical": []}
    for i in range(bs):
        c_end, r_end = ends[i], ends[bs + i]
        if c_end == 0 or r_end == 0:
            raise Undefined(f"row {i if c_end == 0 else bs + i} is empty")
        c, r = ids[i], ids[bs + i]
        if lengths is not None:  # identity and divergence over the real tokens only
            c, r = c[:c_end], r[:r_end]
        cr, rr = rewards[i], rewards[bs + i]
        out["chosen"].append(cr[c_end - 1])
        out["rejected"].append(rr[r_end - 1])
        same = len(c) == len(r) and np.array_equal(c, r)
        out["identical"].append(same)
        if same:
            out["terms"].append(0.0)
            continue
        if loss_type == "span":
            n = min(len(c), len(r))
            diff = np.flatnonzero(c[:n] != r[:n])
            div = int(diff[0]) if len(diff) else n
            end = max(c_end, r_end)
            if div >= end:
                raise Undefined(f"pair {i} differs only after both ends")
            out["terms"].append(float(np.mean(-logsigmoid(cr[div:end] - rr[div:end] - margins[i]))))
        else:
            out["terms"].append(float(-logsigmoid(cr[c_end - 1] - rr[r_end - 1] - margins[i])))
    counted = bs - sum(out["identical"])
    out["loss"] = sum(out["terms"]) / (bs if normalize_by == "pairs" else max(counted, 1))
    wins = [c > r for c, r, same in zip(out["chosen"], out["rejected"], out["identical"]) if not same]
    out["accuracy"] = sum(wins) / max(counted, 1)
    return out


def reference_from_token_lists(pairs, rewards):
    """The same loss from unpadded token lists (what the data path must reproduce): rows i / bs+i."""
    bs = len(rewards) // 2
    terms, c_scores, r_scores = [], [], []
    for i, (c, r) in enumerate(pairs):
        cr, rr = np.asarray(rewards[i], np.float64), np.asarray(rewards[bs + i], np.float64)
        n = min(len(c), len(r))
        div = next((t for t in range(n) if c[t] != r[t]), n)
        end = max(len(c), len(r))
        terms.append(float(np.mean(-logsigmoid(cr[div:end] - rr[div:end]))))
        c_scores.append(cr[len(c) - 1])
        r_scores.append(rr[len(r) - 1])
    return np.array(terms), np.array(c_scores), np.array(r_scores)


_LOSS = {}


def jaxrm_loss(ids, rewards, pad, **options):
    """jit per (shape, options): the strategies use a handful of shapes, so few compiles."""
    key = (
        ids.shape,
        pad,
        tuple(sorted((k, v is None) if k in ("margins", "lengths") else (k, v) for k, v in options.items())),
    )
    if key not in _LOSS:
        static = {k: v for k, v in options.items() if k not in ("margins", "lengths")}
        dynamic = [k for k in ("margins", "lengths") if options.get(k) is not None]
        _LOSS[key] = jax.jit(lambda r, i, *d: pairwise_loss(r, i, pad, **static, **dict(zip(dynamic, d))))
    args = [jnp.asarray(options[k]) for k in ("margins", "lengths") if options.get(k) is not None]
    return jax.device_get(_LOSS[key](jnp.asarray(rewards, jnp.float32), jnp.asarray(ids, jnp.int32), *args))


VARIANTS = [
    (loss_type, normalize_by, with_margins)
    for loss_type in ("span", "last_token")
    for normalize_by in ("pairs", "nonidentical")
    for with_margins in (False, True)
]


def jaxrm_loss_variants(ids, rewards, pad, margins, lengths=None):
    """Every option combination in one jit per (shape, lengths given):
    {(loss_type, normalize_by, margins?): out}."""
    key = ("variants", ids.shape, pad, lengths is None)
    if key not in _LOSS:

        def every(r, i, m, *n):
            return [
                pairwise_loss(
                    r,
                    i,
                    pad,
                    loss_type=lt,
                    normalize_by=nb,
                    margins=m if wm else None,
                    lengths=n[0] if n else None,
                )
                for lt, nb, wm in VARIANTS
            ]

        _LOSS[key] = jax.jit(every)
    args = [jnp.asarray(rewards, jnp.float32), jnp.asarray(ids, jnp.int32), jnp.asarray(margins, jnp.float32)]
    outs = jax.device_get(_LOSS[key](*args, *([] if lengths is None else [jnp.asarray(lengths)])))
    return dict(zip(VARIANTS, outs))


# ----------------------------------------------------------------------------- pairwise_loss on raw batches

V, PAD = 6, 5  # a tiny vocabulary: identical pairs, shared prefixes and PADs are frequent
SHAPES_BS, SHAPES_T = (1, 3), (1, 5, 40)


@st.composite
def raw_batches(draw):
    bs, T = draw(st.sampled_from(SHAPES_BS)), draw(st.sampled_from(SHAPES_T))
    token = st.sampled_from([0, 1, 2, 3, 4] * 2 + [PAD])  # a PAD now and then: sequences of every length
    chosen, rejected = [], []
    for _ in range(bs):
        kind = draw(
            st.sampled_from(
                ["random", "prefix"] * 3 + ["identical", "tail_after_pad", "all_pad", "pad_inside"]
            )
        )
        c = np.array(draw(st.lists(token, min_size=T, max_size=T)))
        r = np.array(draw(st.lists(token, min_size=T, max_size=T)))
        c[0], r[0] = (
            draw(st.sampled_from([0, 1])),
            draw(st.sampled_from([0, 1])),
        )  # empty rows: by "all_pad" only
        n = draw(st.integers(0, T))
        if kind == "identical":
            r = c.copy()
        elif kind == "prefix":  # shared prompt of n tokens, answers after it
            r[:n] = c[:n]
        elif kind == "tail_after_pad":  # same text, different garbage after the first PAD
            c[n:] = PAD
            r[:n], r[n : n + 1] = c[:n], PAD
        elif kind == "all_pad":
            (c if draw(st.booleans()) else r)[:] = PAD
        elif kind == "pad_inside":  # PAD followed by text: the first PAD still ends it
            c[:n] = np.where(c[:n] == PAD, 0, c[:n])
            c[n : n + 1] = PAD
        chosen.append(c)
        rejected.append(r)
    ids = np.stack(chosen + rejected)  # (2bs, T)
    if draw(st.integers(0, 5)) == 0:  # now and then an id out of range
        ids[draw(st.integers(0, 2 * bs - 1)), draw(st.integers(0, T - 1))] = draw(
            st.sampled_from([-1, V, 10**6])
        )
    scale = draw(st.sampled_from([1e-3, 1.0, 40.0]))
    rewards = (np.random.default_rng(draw(st.integers(0, 2**16))).normal(size=ids.shape) * scale).astype(
        np.float32
    )
    return ids, rewards


def check_against_reference(out, expected):
    np.testing.assert_allclose(float(out.loss), expected["loss"], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(out.per_pair_loss, expected["terms"], rtol=2e-5, atol=1e-6)
    np.testing.assert_array_equal(out.identical, expected["identical"])
    np.testing.assert_array_equal(out.chosen_end_scores, np.float32(expected["chosen"]))
    keep = ~np.asarray(expected["identical"])  # the original has no rejected score for identical pairs
    np.testing.assert_array_equal(out.rejected_end_scores[keep], np.float32(expected["rejected"])[keep])
    np.testing.assert_allclose(float(out.accuracy), expected["accuracy"], rtol=1e-6)


@settings(max_examples=300, **SETTINGS)
@given(batch=raw_batches(), with_lengths=st.booleans(), data=st.data())
def test_pairwise_loss_equals_the_reference_or_the_batch_is_rejected(batch, with_lengths, data):
    """Every option (span / last_token, normalize by pairs / non-identical pairs, margins, explicit
    lengths)."""
    ids, rewards = batch
    bs, T = ids.shape[0] // 2, ids.shape[1]
    margins = data.draw(st.lists(st.floats(-3, 3, width=32), min_size=bs, max_size=bs))
    lengths = None
    if with_lengths:  # explicit ends; now and then one outside [1, T]
        lengths = data.draw(st.lists(st.integers(1, T), min_size=2 * bs, max_size=2 * bs))
        if data.draw(st.integers(0, 7)) == 0:
            lengths[data.draw(st.integers(0, 2 * bs - 1))] = data.draw(st.sampled_from([-1, 0, T + 1]))
    out_of_range = bool(((ids < 0) | (ids >= V)).any())
    bad_length = lengths is not None and any(not 0 <= n <= T for n in lengths)

    try:
        validate_pair_batch(ids, PAD, vocab_size=V, block_size=T, lengths=lengths)
        accepted = True
    except PairBatchError as e:
        accepted, message = False, str(e)
    if bad_length:  # no reference value: refused, and never silently scored
        assert not accepted and "outside [" in message
        return
    outs = jaxrm_loss_variants(ids, rewards, PAD, margins, lengths)

    for (loss_type, normalize_by, with_margins), out in outs.items():
        options = dict(
            loss_type=loss_type,
            normalize_by=normalize_by,
            lengths=lengths,
            margins=margins if with_margins else None,
        )
        try:
            expected = reference_loss(ids, rewards, PAD, **options)
        except Undefined as why:
            event(f"no value: {str(why).split()[-1]}")
            # the original has no value: the validator refuses it, and the loss (computed anyway) is NaN
            assert not accepted, f"accepted a batch the original cannot score ({why})"
            assert any(s in message for s in ("is empty", "first differs", "outside")), message
            if "is empty" in str(why) or loss_type == "span":
                assert np.isnan(float(out.loss)), f"{options}: no value, must be NaN, never a number"
            continue
        # a defined value: jaxrm computes exactly it, whatever the validator says
        event(f"value ({'accepted' if accepted else 'refused'})")
        check_against_reference(out, expected)
        assert np.isfinite(float(out.loss))
        if out_of_range:  # the model cannot embed it: refused before training, naming the id
            assert not accepted and "outside [0, 6)" in message
        elif lengths is None and loss_type == "last_token" and not accepted:
            assert "first differs" in message  # differs only in the padding: no span for the default loss
        else:
            assert accepted, message


def test_reference_is_the_seed_loop_on_a_hand_made_batch():
    """The reference itself, checked on numbers worked out by hand from the seed's loop."""
    ids = np.array(
        [
            [1, 2, 3, PAD],
            [1, 1, PAD, PAD],  # chosen
            [1, 2, 4, 4],
            [1, 1, PAD, PAD],
        ]
    )  # rejected: pair 0 differs at 2, pair 1 identical
    rewards = np.arange(16, dtype=np.float32).reshape(4, 4) / 10
    expected = reference_loss(ids, rewards, PAD)
    span = -logsigmoid(rewards[0, 2:4] - rewards[2, 2:4]).mean()  # div 2, end max(3, 4) = 4
    assert expected["loss"] == pytest.approx(span / 2)  # bs = 2 counts the identical pair
    assert expected["identical"] == [False, True] and expected["chosen"][0] == rewards[0, 2]
    check_against_reference(jaxrm_loss(ids, rewards, PAD), expected)
    check_against_reference(
        jaxrm_loss_variants(ids, rewards, PAD, [0.0, 0.0])[("span", "pairs", False)], expected
    )


# ----------------------------------------------------------------------------- encode_pairs

FRAGMENTS = [
    "a",
    "b",
    " ",
    " good",
    " bad",
    "!",
    ".",
    "\n",
    "\t",
    "é",
    "😀",
    "中文",
    "\x00",
    "\x7f",
    "\ufffd",
    "<|endoftext|>",
]
LONG = ["x" * 70, " word" * 30, "😀" * 20]  # over every seq_len for the byte tokenizer, some for GPT-2
texts = st.lists(st.sampled_from(FRAGMENTS), max_size=4).map("".join)  # "" too: an empty answer
nonempty_texts = st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=3).map("".join)


@st.composite
def answer_texts(draw):
    """Mostly short; an empty answer or a very long one now and then."""
    choice = draw(st.integers(0, 9))
    return "" if choice == 0 else draw(st.sampled_from(LONG)) if choice == 1 else draw(nonempty_texts)


PAIR_FAULTS = (
    "empty",
    "surrogate",
    "margin_nan",
    "margin_inf",
    "margin_huge",
    "ids_pad",
    "ids_out_of_range",
    "ids_negative",
    "ids_empty",
)

TOKENIZERS = {"byte": ByteTokenizer(), "gpt2": GPT2Tokenizer()}
VOCABS = {"byte": (257, 128, 300), "gpt2": (50257, 50300, 1000)}  # model vocab: equal, smaller, larger
SEQ_LENS = (1, 4, 16, 16, 64, 64, 64)
EVAL_BS = 4


@st.composite
def pair_lists(draw, vocab_size):
    """1-6 pairs: unicode, empty answers, identical, shared prompts, long texts; now and then a fault."""
    pairs = []
    for _ in range(draw(st.integers(1, 6))):
        fault = draw(st.sampled_from(PAIR_FAULTS)) if draw(st.integers(0, 14)) == 0 else None
        margin = draw(st.one_of(st.none(), st.floats(-5, 5)))
        margin = {"margin_nan": math.nan, "margin_inf": -math.inf, "margin_huge": 1e300}.get(fault, margin)
        if draw(st.integers(0, 4)) == 0 or (fault or "").startswith("ids"):  # pre-tokenized
            ids = st.lists(st.integers(0, min(vocab_size, 300) - 2), min_size=1, max_size=6)
            c = draw(ids)
            r = list(c) if draw(st.integers(0, 5)) == 0 else c[: draw(st.integers(0, len(c)))] + draw(ids)
            bad = {
                "ids_pad": [vocab_size - 1],
                "ids_out_of_range": [vocab_size],
                "ids_negative": [-1],
                "ids_empty": [],
            }.get(fault)
            if bad is not None:
                c = bad if fault == "ids_empty" else c[:1] + bad + c[1:]
            pairs.append(PreferencePair("", "", "", margin, chosen_ids=tuple(c), rejected_ids=tuple(r)))
            continue
        prompt, chosen = draw(st.one_of(st.just(""), nonempty_texts)), draw(answer_texts())
        rejected = chosen if draw(st.integers(0, 5)) == 0 else draw(answer_texts())
        if not prompt + chosen or not prompt + rejected:  # an empty sequence only as the "empty" fault
            prompt = "Q:"
        if fault == "empty":
            prompt, chosen = "", ""
        elif fault == "surrogate":  # what a JSON "\ud800" escape gives
            chosen += "\ud800"
        pairs.append(PreferencePair(prompt, chosen, rejected, margin))
    return pairs


def shared_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def expected_encoding(pairs, tokenizer, seq_len, pad_id, vocab_size, truncation):
    """("error", pair index) or ("ok", kept [(c, r, margin)], stats), from encode_pairs' documented rules."""
    kept, stats = [], {"dropped_too_long": 0, "dropped_identical": 0}
    for i, p in enumerate(pairs):
        if p.chosen_ids is not None:
            c, r = list(p.chosen_ids), list(p.rejected_ids)
        else:
            try:
                (p.prompt + p.chosen + p.rejected).encode("utf-8")
            except UnicodeEncodeError:
                return ("error", i, "not valid Unicode")
            c, r = tokenizer.encode(p.prompt + p.chosen), tokenizer.encode(p.prompt + p.rejected)
        for ids in (c, r):
            if not ids:
                return ("error", i, "zero tokens")
            if any(not 0 <= t < vocab_size for t in ids):
                return ("error", i, f"outside [0, {vocab_size})")
            if pad_id in ids:
                return ("error", i, f"pad id {pad_id}")
        if p.margin is not None and not abs(p.margin) <= np.finfo(np.float32).max:
            return ("error", i, "not a finite float32")
        if c == r:
            stats["dropped_identical"] += 1
            continue
        cut = max(len(c), len(r)) - seq_len
        if truncation == "left" and 0 < cut < shared_prefix(c, r):  # keep the answers and one shared token
            c, r = c[cut:], r[cut:]
        if max(len(c), len(r)) > seq_len:
            if truncation == "error":
                return ("error", i, f"> seq_len {seq_len}")
            stats["dropped_too_long"] += 1
            continue
        kept.append((c, r, 0.0 if p.margin is None else p.margin))
    if not kept:
        return ("error", None, "no pairs left")
    return ("ok", kept, stats)


@settings(max_examples=200, **SETTINGS)
@given(
    data=st.data(),
    name=st.sampled_from(["byte", "gpt2"]),
    seq_len=st.sampled_from(SEQ_LENS),
    truncation=st.sampled_from(["drop", "error", "left"]),
    seed=st.integers(0, 2**16),
)
def test_encode_pairs_then_loss_equals_the_reference_or_a_clear_data_error(
    data, name, seq_len, truncation, seed
):
    tokenizer = TOKENIZERS[name]
    vocab_size = data.draw(st.sampled_from(VOCABS[name][:1] * 4 + VOCABS[name][1:]))
    pad_id = vocab_size - 1
    pairs = data.draw(pair_lists(vocab_size))
    expected = expected_encoding(pairs, tokenizer, seq_len, pad_id, vocab_size, truncation)
    try:
        encoded, stats = encode_pairs(
            pairs, tokenizer, seq_len=seq_len, pad_id=pad_id, vocab_size=vocab_size, truncation=truncation
        )
    except DataError as e:
        event(f"refused: {expected[2]}")
        assert expected[0] == "error", f"refused good pairs: {e}"
        _, index, reason = expected
        assert reason in str(e), (reason, str(e))
        if index is not None:
            assert f"pair {index}" in str(e), str(e)
        return
    assert expected[0] == "ok", f"accepted pairs that must be refused ({expected[2]} at pair {expected[1]})"
    kept = expected[1]
    event(f"encoded {len(kept)} pairs")
    assert stats["pairs_kept"] == len(kept) == len(encoded)
    assert {k: stats[k] for k in expected[2]} == expected[2]
    for j, (c, r, margin) in enumerate(kept):
        for row, length, seq in (
            (encoded.chosen_ids[j], encoded.chosen_lengths[j], c),
            (encoded.rejected_ids[j], encoded.rejected_lengths[j], r),
        ):
            assert length == len(seq) and list(row[:length]) == seq and (row[length:] == pad_id).all()
            assert first_pad(row, pad_id) == length  # the first PAD is the true end
        assert c != r and encoded.margins[j] == np.float32(margin)

    # the batches the trainer sees: valid, and the loss equals the reference on the token lists
    rng = np.random.default_rng(seed)
    for start, batch in zip(range(0, len(kept), EVAL_BS), eval_batches(encoded, EVAL_BS)):
        ids, valid = batch["input_ids"], batch["valid"]
        validate_pair_batch(ids, pad_id, vocab_size=vocab_size, block_size=seq_len)
        rewards = rng.normal(size=ids.shape).astype(np.float32)
        out = jaxrm_loss(ids, rewards, pad_id)
        terms, c_scores, r_scores = reference_from_token_lists(
            [(c, r) for c, r, _ in kept[start : start + EVAL_BS]], rewards
        )
        n = int(valid.sum())
        np.testing.assert_allclose(out.per_pair_loss[:n], terms, rtol=2e-5, atol=1e-6)
        np.testing.assert_array_equal(out.chosen_end_scores[:n], np.float32(c_scores))
        np.testing.assert_array_equal(out.rejected_end_scores[:n], np.float32(r_scores))
        assert not out.identical[:n].any() and np.isfinite(float(out.loss))


# ----------------------------------------------------------------------------- the file loaders


def split_prompt(a, b):
    """The implicit prompt: the longest common prefix, cut back to 0 or to just after whitespace."""
    n = shared_prefix(a, b)
    while n and not a[n - 1].isspace():
        n -= 1
    return a[:n], a[n:], b[n:]


def render(messages):
    return "".join(
        CHAT_TEMPLATE.format(role=ROLE_NAMES.get(m["role"], m["role"].capitalize()), content=m["content"])
        for m in messages
    )


BAD = object()  # a row the loader must refuse
HUGE_INT = "__HUGE_INT__"  # written as a 5000-digit integer (beyond Python's int-parsing limit)
file_texts = st.lists(
    st.sampled_from([f for f in FRAGMENTS if f != "\ud800"] + [",", '"', "\r\n", 'é,"x"']), max_size=4
).map("".join)
ROW_FAULTS = (
    "margin_text",
    "margin_nan",
    "margin_huge",
    "margin_overflow",
    "missing",
    "surrogate",
    "bad_ids",
    "prompt_type",
)
CSV_FAULTS = (
    "margin_text",
    "margin_huge",
    "margin_overflow",
    "surrogate",
    "bad_ids",
)  # the rest is JSON-only


@st.composite
def rows(draw, kind, faults):
    """(the row as written, the PreferencePair expected back or BAD)."""
    margin = draw(st.one_of(st.none(), st.floats(-5, 5, allow_nan=False), st.integers(-3, 3)))
    expected_margin = None if margin is None else float(margin)
    if kind == "explicit":
        row = {"prompt": draw(file_texts), "chosen": draw(file_texts), "rejected": draw(file_texts)}
        pair = PreferencePair(row["prompt"], row["chosen"], row["rejected"], expected_margin)
    elif kind == "implicit":
        prompt = draw(file_texts)
        row = {"chosen": prompt + draw(file_texts), "rejected": prompt + draw(file_texts)}
        pair = PreferencePair(*split_prompt(row["chosen"], row["rejected"]), expected_margin)
    elif kind == "chat":
        msg = st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "assistant", "system", "tool"]), "content": file_texts}
        )
        shared = draw(st.lists(msg, max_size=2))
        row = {
            "chosen": shared + draw(st.lists(msg, max_size=2)),
            "rejected": shared + draw(st.lists(msg, max_size=2)),
        }
        pair = PreferencePair(*split_prompt(render(row["chosen"]), render(row["rejected"])), expected_margin)
    else:  # pre-tokenized
        ids = st.lists(st.integers(0, 70000), min_size=1, max_size=5)
        row = {"input_ids_chosen": draw(ids), "input_ids_rejected": draw(ids)}
        pair = PreferencePair(
            "",
            "",
            "",
            expected_margin,
            chosen_ids=tuple(row["input_ids_chosen"]),
            rejected_ids=tuple(row["input_ids_rejected"]),
        )
    if margin is not None:
        row["margin"] = margin
    if draw(st.integers(0, 19)) == 0:  # now and then a row that must be refused
        how = draw(st.sampled_from(faults))
        if how == "prompt_type" and kind == "tokenized":
            how = "bad_ids"  # pre-tokenized rows never read the prompt
        if how == "margin_text":
            row["margin"] = "lots"
        elif how == "margin_nan":
            row["margin"] = math.nan  # JSON's NaN token
        elif how == "margin_huge":
            row["margin"] = 1e300  # finite as float64, inf as float32
        elif how == "margin_overflow":
            row["margin"] = 10**400  # beyond float64
        elif how == "missing":
            row.pop("rejected") if "rejected" in row else row.pop("input_ids_rejected")
        elif how == "surrogate":  # a JSON "\ud800" escape: a lone surrogate, not text
            if kind == "chat":
                row["chosen"] = [{"role": "user", "content": "a\ud800"}]
            else:
                row["input_ids_chosen" if kind == "tokenized" else "chosen"] = "a\ud800"
        elif how == "bad_ids":
            row["input_ids_chosen"] = draw(
                st.sampled_from([[], [-1], [1.5], [True], "1 2", [[1]], [HUGE_INT]])
            )
            row.setdefault("input_ids_rejected", [1])
        else:
            row["prompt"] = draw(st.sampled_from([5, None, {"a": 1}]))
        pair = BAD
    return row, pair


def csv_cell(value):
    return json.dumps(value) if isinstance(value, (list, dict)) else ("" if value is None else str(value))


def file_bytes(fmt, rows_, ensure_ascii):
    """The rows as a JSON Lines / JSON / CSV file; lone surrogates written raw become invalid UTF-8."""
    if fmt == "jsonl":
        text = "".join(json.dumps(row, ensure_ascii=ensure_ascii) + "\n" for row in rows_)
    elif fmt == "json":
        text = json.dumps(rows_, indent=1, ensure_ascii=ensure_ascii)
    else:
        columns = list(dict.fromkeys(k for row in rows_ for k in row))
        buf = io.StringIO(newline="")
        writer = csv.writer(buf)
        writer.writerow(columns)
        for row in rows_:
            writer.writerow([csv_cell(row.get(k)) for k in columns])
        text = buf.getvalue()
    huge = "1" * 5000
    text = text.replace(f'""{HUGE_INT}""', huge).replace(f'"{HUGE_INT}"', huge)
    return text.encode("utf-8", "surrogatepass")


def same_pairs(got, want):
    return [(p.prompt, p.chosen, p.rejected, p.margin, p.chosen_ids, p.rejected_ids) for p in got] == [
        (p.prompt, p.chosen, p.rejected, p.margin, p.chosen_ids, p.rejected_ids) for p in want
    ]


@settings(max_examples=250, **SETTINGS)
@given(
    data=st.data(),
    fmt=st.sampled_from(["jsonl", "json", "csv"]),
    gz=st.booleans(),
    kind=st.sampled_from(["explicit", "implicit", "chat", "tokenized"]),
    ensure_ascii=st.booleans(),
    corrupt=st.sampled_from([None, None, None, "invalid_utf8", "truncate"]),
)
def test_file_loaders_read_back_what_was_written_or_refuse_clearly(
    tmp_path_factory, data, fmt, gz, kind, ensure_ascii, corrupt
):
    if fmt == "csv" and kind == "chat":
        kind = "explicit"  # chat messages are JSON structures, not CSV cells
    items = data.draw(
        st.lists(rows(kind, CSV_FAULTS if fmt == "csv" else ROW_FAULTS), min_size=1, max_size=5)
    )
    raw = file_bytes(fmt, [row for row, _ in items], ensure_ascii)
    if corrupt == "invalid_utf8":
        at = data.draw(st.integers(0, len(raw)))
        raw = (
            raw[:at] + data.draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xe2\x82"])) + raw[at:]
        )
    elif (
        corrupt == "truncate" and fmt != "csv"
    ):  # a CSV cut inside a cell is indistinguishable from a shorter cell
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        corrupt = None
    path = tmp_path_factory.mktemp("pairs") / (f"pairs.{fmt}" + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(raw, mtime=0) if gz else raw)

    expected = [pair for _, pair in items]
    try:
        got = load_pairs(path)
    except DataError as e:
        message = str(e)
        event(f"refused ({corrupt or 'bad row'})")
        assert str(path) in message, message  # every error names the file ...
        assert corrupt or BAD in expected, f"refused a good file: {message}"
        return
    event(f"read {fmt}")
    assert corrupt != "invalid_utf8", "read a file that is not UTF-8"
    if corrupt == "truncate":  # JSON Lines cut at a line end: the complete lines, never a half pair
        assert fmt == "jsonl" and BAD not in expected[: len(got)] and same_pairs(got, expected[: len(got)])
    else:
        assert BAD not in expected, "accepted a row that must be refused"
        assert same_pairs(got, expected)
    # and what was read encodes or is refused clearly (never an unrelated exception)
    tokenizer = TOKENIZERS["byte"]
    try:
        encode_pairs(got, tokenizer, seq_len=64, pad_id=256, vocab_size=257)
    except DataError:
        pass
