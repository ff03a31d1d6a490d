"""`jaxrm lint DATA`: a report on preference data before training.

Each check counts its pairs and keeps the first few locations ("FILE:LINE" / "FILE: row N"):
  too_long                      longer than seq_len tokens (training drops them, or errors)
  identical                     chosen and rejected are the same token sequence (no loss term)
  identical_after_truncation    different, but the same in their first seq_len tokens
  pad_in_text                   the PAD id (vocab_size - 1) inside a sequence: the first PAD ends it
                                (an error; with lengths="explicit" only a note: lengths end sequences)
  eot_in_text                   the tokenizer's end-of-text id inside a sequence
  out_of_vocab                  token ids >= the model's vocab_size
  divergence_at_0               chosen and rejected differ at token 0 (no shared prompt; the
                                original's loss asserts divergence > 0)
  empty_answer                  an empty chosen or rejected answer (after the prompt)
  empty_sequence                a sequence of zero tokens
  duplicate                     the same (prompt, chosen, rejected) as an earlier pair
  in_other_file                 (with --against FILE) the same prompt + chosen or prompt + rejected
                                text also occurs in the other file (e.g. train vs test)
"""

from __future__ import annotations

import numpy as np

from jaxrm.config import LENGTHS
from jaxrm.data import pair_ids
from jaxrm.formats import pair_location
from jaxrm.layouts import layout_savings
from jaxrm.tokenizer import first_out_of_range

ERRORS = ("pad_in_text", "out_of_vocab", "empty_sequence")  # training refuses these
EXPLICIT_LENGTH_ERRORS = ("out_of_vocab", "empty_sequence")  # ... with lengths="explicit"
CHECKS = (
    "too_long",
    "identical",
    "identical_after_truncation",
    "pad_in_text",
    "eot_in_text",
    "out_of_vocab",
    "divergence_at_0",
    "empty_answer",
    "empty_sequence",
    "duplicate",
)


def lint_pairs(
    pairs,
    tokenizer,
    *,
    seq_len: int,
    vocab_size: int,
    source: str = "<pairs>",
    against=None,
    examples: int = 5,
    lengths: str = "first_pad",
    batch_size: int = 16,
) -> dict:
    """lengths: "first_pad" (the first PAD ends a sequence: PAD inside a text is an error) or
    "explicit" (TrainConfig.lengths="explicit": a PAD / end-of-text id inside a text is reported,
    not refused)."""
    if lengths not in LENGTHS:
        raise ValueError(f"lengths must be one of {LENGTHS}, got {lengths!r}")
    errors = ERRORS if lengths == "first_pad" else EXPLICIT_LENGTH_ERRORS
    checks = {name: [] for name in CHECKS}
    other_texts = None
    if against is not None:
        checks["in_other_file"] = []
        other_texts = {p.prompt + a for p in against for a in (p.chosen, p.rejected)}
    seen = set()
    longest = []  # tokens of each pair's longer side
    sequences = []
    for i, p in enumerate(pairs):
        c, r = pair_ids(p, tokenizer)
        longest.append(max(len(c), len(r)))
        sequences.append((c, r))
        for flag in _flags(
            p, c, r, tokenizer, seq_len=seq_len, vocab_size=vocab_size, seen=seen, other_texts=other_texts
        ):
            checks[flag].append(pair_location(source, i, p))
    longest = np.array(longest or [0])
    report = {
        "source": source,
        "pairs": len(pairs),
        "seq_len": seq_len,
        "vocab_size": vocab_size,
        "lengths": lengths,
        "tokens_per_pair": {
            "min": int(longest.min()),
            "p50": int(np.percentile(longest, 50)),
            "p90": int(np.percentile(longest, 90)),
            "p99": int(np.percentile(longest, 99)),
            "max": int(longest.max()),
            "mean": round(float(longest.mean()), 2),
        },
        "checks": {name: {"count": len(found), "first": found[:examples]} for name, found in checks.items()},
    }
    report["trainable_pairs"] = len(pairs) - len(
        {w for name in ("too_long", "identical", *errors) for w in checks[name]}
    )
    report["layouts"] = layout_savings(sequences, seq_len, vocab_size - 1, batch_size, lengths == "explicit")
    report["error_checks"] = list(errors)
    report["errors"] = sum(len(checks[name]) for name in errors)
    return report


def _flags(
    p,
    c: list[int],
    r: list[int],
    tokenizer,
    *,
    seq_len: int,
    vocab_size: int,
    seen: set,
    other_texts: set | None,
) -> list[str]:
    """The checks pair p (token ids c, r) fails; adds it to `seen` (the duplicate check)."""
    pad_id, eot_id = vocab_size - 1, getattr(tokenizer, "eot_id", None)
    flags = []
    if not c or not r:
        flags.append("empty_sequence")
    if p.chosen_ids is None and (not p.chosen or not p.rejected):
        flags.append("empty_answer")
    if max(len(c), len(r)) > seq_len:
        flags.append("too_long")
    if c == r:
        flags.append("identical")
    elif c[:seq_len] == r[:seq_len]:
        flags.append("identical_after_truncation")
    if pad_id in c or pad_id in r:
        flags.append("pad_in_text")
    if eot_id is not None and eot_id != pad_id and (eot_id in c or eot_id in r):
        flags.append("eot_in_text")
    if first_out_of_range(c + r, vocab_size) is not None:
        flags.append("out_of_vocab")
    if c and r and c != r and c[0] != r[0]:
        flags.append("divergence_at_0")
    key = (p.prompt, p.chosen, p.rejected, p.chosen_ids, p.rejected_ids)
    if key in seen:
        flags.append("duplicate")
    seen.add(key)
    if (
        other_texts is not None
        and p.chosen_ids is None
        and (p.prompt + p.chosen in other_texts or p.prompt + p.rejected in other_texts)
    ):
        flags.append("in_other_file")
    return flags


def format_report(report: dict) -> str:
    t = report["tokens_per_pair"]
    rankings = report.get("from_rankings")
    lines = [
        f"{report['source']}: {report['pairs']} pairs"
        + (f" (the ordered pairs of {rankings} rankings)" if rankings else "")
        + f", {report['trainable_pairs']} trainable at seq_len {report['seq_len']}"
        + (" (explicit lengths)" if report.get("lengths") == "explicit" else ""),
        f"tokens per pair (longer side): min {t['min']}  p50 {t['p50']}  p90 {t['p90']}  p99 {t['p99']}  "
        f"max {t['max']}  mean {t['mean']}",
    ]
    if "layouts" in report:
        s = report["layouts"]
        per_pair = {k: v / max(s["pairs"], 1) for k, v in s["tokens"].items()}
        lines.append(
            f"layouts: tokens per pair rows {per_pair['rows']:.0f} (padded), real {per_pair['real']:.1f}, "
            f"shared {per_pair['shared']:.1f} ({s['shared_saves_vs_rows']:.1%} fewer than rows, "
            f"{s['shared_saves_vs_real']:.1%} fewer than real); packed: {s['packed_rows_per_batch']} "
            f"rows per batch of {s['batch_size']} pairs"
        )
    for name, c in report["checks"].items():
        mark = (
            "ERROR"
            if name in report.get("error_checks", ERRORS) and c["count"]
            else ("warn" if c["count"] else "ok")
        )
        lines.append(
            f"  {mark:<5} {name:<28} {c['count']:>7}"
            + (f"   first: {', '.join(c['first'])}" if c["first"] else "")
        )
    return "\n".join(lines)
