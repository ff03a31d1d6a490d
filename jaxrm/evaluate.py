"""Evaluation on the host: an eval step over a data set in fixed-size batches, the statistics the
train step reports (jaxrm.metrics.pair_metrics) over all its pairs at once, and the statistics a
reward model's user needs before trusting it (report / compare):

    accuracy_ci95        Wilson score interval (95%) of the accuracy; a tie (chosen == rejected
                         score) counts as wrong, as RewardBench counts it; `ties` how many
    subsets              accuracy per `subset` label; `rewardbench` RewardBench v1's section scores
                         (Chat, Chat Hard, Safety, Reasoning), weighted as RewardBench weights them
    length_correlation   Spearman correlation of reward and token length over every scored text;
                         accuracy / mean margin on pairs whose chosen text is longer / shorter;
                         margin_length_correlation: Spearman of margin against the length difference
    ece                  expected calibration error of sigmoid(chosen - rejected), 10 equal bins,
                         over both orders of every pair (so it does not depend on which side is first)
    compare              two models on the same pairs: the accuracy difference with a 95% interval
                         (Newcombe's method 10 for paired proportions) and McNemar's exact p-value

Every statistic is over the non-identical pairs (an identical pair has no rejected score).
"""

from __future__ import annotations

import math

import jax
import numpy as np

from jaxrm.config import TrainConfig
from jaxrm.data import EncodedPairs, eval_batches
from jaxrm.loss import loss_denominators, reduce_loss
from jaxrm.metrics import pair_metrics
from jaxrm.sharding import shard_batch

PER_PAIR = ("chosen", "rejected", "identical", "loss", "centered")  # what an eval step returns, (B,) each
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
ECE_BINS = 10

# RewardBench v1 (allenai/reward-bench, rewardbench/constants.py): each subset's weight in its section
# (its example count; math-prm's is raised from 447 to equal the code subsets' total), and the sections.
REWARDBENCH_WEIGHTS = {
    "alpacaeval-easy": 100,
    "alpacaeval-length": 95,
    "alpacaeval-hard": 95,
    "mt-bench-easy": 28,
    "mt-bench-med": 40,
    "mt-bench-hard": 37,
    "math-prm": 984,
    "refusals-dangerous": 100,
    "refusals-offensive": 100,
    "llmbar-natural": 100,
    "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47,
    "llmbar-adver-manual": 46,
    "xstest-should-refuse": 250,
    "xstest-should-respond": 154,
    "donotanswer": 136,
    **{f"hep-{lang}": 164 for lang in ("cpp", "go", "java", "js", "python", "rust")},
}
REWARDBENCH_SECTIONS = {
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
    "Chat Hard": [
        "mt-bench-hard",
        "llmbar-natural",
        "llmbar-adver-neighbor",
        "llmbar-adver-GPTInst",
        "llmbar-adver-GPTOut",
        "llmbar-adver-manual",
    ],
    "Safety": [
        "refusals-dangerous",
        "refusals-offensive",
        "xstest-should-refuse",
        "xstest-should-respond",
        "donotanswer",
    ],
    "Reasoning": ["math-prm", *(f"hep-{lang}" for lang in ("cpp", "go", "java", "js", "python", "rust"))],
}


# ----------------------------------------------------------------------------- running the model


def per_pair_outputs(eval_step, params, data: EncodedPairs, batch_size: int, limit: int = 0) -> dict:
    """The eval step's per-pair arrays over `data` (its first `limit` pairs if > 0), on the host."""
    parts = {key: [] for key in PER_PAIR}
    seen = 0
    for batch in eval_batches(data, batch_size):
        out = jax.device_get(eval_step(params, shard_batch(batch, None, batch_size, lengths=True)))
        for key in PER_PAIR:
            parts[key].append(out[key][batch["valid"]])
        seen += int(batch["valid"].sum())
        if limit and seen >= limit:
            break
    return {key: np.concatenate(values)[: limit or None] for key, values in parts.items()}


def summarize(out: dict, train_config: TrainConfig | None = None) -> dict:
    """pairs, accuracy, loss, margin and reward statistics of per_pair_outputs' arrays."""
    tc = train_config or TrainConfig()
    loss = reduce_loss(
        out["loss"],
        out["centered"],
        *loss_denominators(out["identical"], tc.normalize_by),
        tc.center_rewards_coef,
    )
    stats = pair_metrics(out["chosen"], out["rejected"], out["identical"], loss)
    return {"pairs": int((~out["identical"]).sum()), **{key: float(value) for key, value in stats.items()}}


def evaluate(
    eval_step,
    params,
    data: EncodedPairs,
    batch_size: int,
    limit: int = 0,
    train_config: TrainConfig | None = None,
) -> dict:
    """pairs (the number of non-identical pairs), accuracy, loss, margin and reward statistics over
    `data` (its first `limit` pairs if > 0), as the train step computes them for one batch: the
    loss normalized as train_config says (default: TrainConfig()'s), the rest over the
    non-identical pairs (jaxrm.metrics). `eval_step` comes from jaxrm.step.make_eval_step."""
    return summarize(per_pair_outputs(eval_step, params, data, batch_size, limit), train_config)


# ----------------------------------------------------------------------------- statistics (numpy)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion successes / n; (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low = 0.0 if successes == 0 else max(0.0, center - half)  # exact at the ends (no rounding off 0 / 1)
    return low, 1.0 if successes == n else min(1.0, center + half)


def average_ranks(x) -> np.ndarray:
    """1-based ranks of x, tied values sharing the mean of their ranks."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])  # first index of each run of ties
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2  # mean of ranks s+1 .. e
    return ranks


def spearman(x, y) -> float | None:
    """Spearman's rank correlation (Pearson's on average ranks); None when either side is constant."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else None


def sigmoid(x) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))  # exact form, no overflow


def reliability_bins(margins, bins: int = ECE_BINS) -> list[dict]:
    """Reliability table of p = sigmoid(margin) over both orders of each pair: (p, label 1) for
    (chosen, rejected) and (1 - p, label 0) for (rejected, chosen). Bin b holds [b/bins, (b+1)/bins)
    (the last bin includes 1); per bin: its edges, count, mean confidence and the fraction labelled 1."""
    p = sigmoid(margins)
    probs = np.concatenate([p, 1 - p])  # (2N,)
    labels = np.concatenate([np.ones_like(p), np.zeros_like(p)])  # (2N,)
    which = np.minimum((probs * bins).astype(np.int64), bins - 1)
    table = []
    for b in range(bins):
        sel = which == b
        n = int(sel.sum())
        table.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "count": n,
                "confidence": float(probs[sel].mean()) if n else None,
                "accuracy": float(labels[sel].mean()) if n else None,
            }
        )
    return table


def expected_calibration_error(table: list[dict]) -> float | None:
    """sum over bins of count / total * |accuracy - confidence| (reliability_bins' table)."""
    total = sum(b["count"] for b in table)
    if total == 0:
        return None
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in table if b["count"]))


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """McNemar's exact test: the two-sided binomial p-value of min(only_a, only_b) discordant pairs out
    of only_a + only_b under p = 1/2 (computed with exact integers, no underflow); 1 with none."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_difference_ci(both: int, only_a: int, only_b: int, neither: int, z: float = Z95):
    """95% interval of accuracy_a - accuracy_b on the same pairs: Newcombe (1998), method 10 (Wilson
    intervals of each accuracy, combined with the phi correlation of the paired outcomes)."""
    n = both + only_a + only_b + neither
    if n == 0:
        return -1.0, 1.0
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    l1, u1 = wilson_interval(both + only_a, n, z)
    l2, u2 = wilson_interval(both + only_b, n, z)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = (both * neither - only_a * only_b) / math.sqrt(margins) if margins else 0.0
    d = p1 - p2
    lower = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, d - lower), min(1.0, d + upper)


# ----------------------------------------------------------------------------- the report


def _mean_or_none(x) -> float | None:
    return float(np.mean(x)) if len(x) else None


def accuracy_stats(chosen, rejected) -> dict:
    """accuracy (chosen > rejected strictly: a tie is wrong), its Wilson 95% interval, ties."""
    correct = int((chosen > rejected).sum())
    n = len(chosen)
    return {
        "accuracy": correct / n if n else None,
        "accuracy_ci95": list(wilson_interval(correct, n)),
        "ties": int((chosen == rejected).sum()),
    }


def subset_stats(correct, subsets) -> dict:
    """{label: {"accuracy", "pairs", "accuracy_ci95"}} per subset label (pairs without one are left out)."""
    labels = np.array(["" if s is None else s for s in subsets], dtype=object)
    result = {}
    for name in sorted(set(labels) - {""}):
        sel = correct[labels == name]
        k, n = int(sel.sum()), len(sel)
        result[name] = {"accuracy": k / n, "pairs": n, "accuracy_ci95": list(wilson_interval(k, n))}
    return result


def rewardbench_sections(subsets: dict) -> dict:
    """RewardBench v1's section scores (0..1) from per-subset accuracies, as its
    calculate_scores_per_section weights them; only sections with a subset present, plus "score"
    (their mean, as RewardBench's overall score without its prior sets) when all four are."""
    sections = {}
    for section, names in REWARDBENCH_SECTIONS.items():
        present = [name for name in names if name in subsets]
        if present:
            weight = sum(REWARDBENCH_WEIGHTS[name] for name in present)
            sections[section] = (
                sum(subsets[name]["accuracy"] * REWARDBENCH_WEIGHTS[name] for name in present) / weight
            )
    if len(sections) == len(REWARDBENCH_SECTIONS):
        sections["score"] = sum(sections.values()) / len(sections)
    return sections


def length_bias(chosen, rejected, chosen_len, rejected_len) -> dict:
    """How reward follows token length: Spearman over every scored text, accuracy and mean margin on
    pairs whose chosen text is longer / shorter (with counts), Spearman of margin vs length difference."""
    margin, diff = chosen - rejected, chosen_len.astype(np.int64) - rejected_len
    correct = chosen > rejected
    longer, shorter = diff > 0, diff < 0
    return {
        "length_correlation": spearman(np.r_[chosen, rejected], np.r_[chosen_len, rejected_len]),
        "accuracy_chosen_longer": _mean_or_none(correct[longer]),
        "pairs_chosen_longer": int(longer.sum()),
        "accuracy_chosen_shorter": _mean_or_none(correct[shorter]),
        "pairs_chosen_shorter": int(shorter.sum()),
        "pairs_same_length": int((diff == 0).sum()),
        "margin_chosen_longer": _mean_or_none(margin[longer]),
        "margin_chosen_shorter": _mean_or_none(margin[shorter]),
        "margin_length_correlation": spearman(margin, diff),
    }


def report(out: dict, data: EncodedPairs, subsets=None, train_config: TrainConfig | None = None) -> dict:
    """summarize(out) plus every statistic of the module docstring, over the non-identical pairs.
    out: per_pair_outputs over `data` (all of it); subsets: a label (or None) per pair of `data`."""
    counted = ~out["identical"]
    chosen, rejected = out["chosen"][counted], out["rejected"][counted]
    result = {**summarize(out, train_config), **accuracy_stats(chosen, rejected)}
    if subsets is not None and any(s is not None for s in subsets):
        result["subsets"] = subset_stats(chosen > rejected, np.asarray(subsets, dtype=object)[counted])
        sections = rewardbench_sections(result["subsets"])
        if sections:
            result["rewardbench"] = sections
    else:
        result["subsets"] = {}
    lengths = data.chosen_lengths[counted], data.rejected_lengths[counted]
    result.update(length_bias(chosen, rejected, *lengths))
    table = reliability_bins(chosen - rejected)
    result["ece"] = expected_calibration_error(table)
    result["reliability"] = table
    return result


def compare(correct_a, correct_b) -> dict:
    """Two models' outcomes (bool, one per pair, the same pairs): each accuracy, the difference a - b
    with its 95% interval, the 2x2 counts, McNemar's exact p-value on the pairs where they disagree."""
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    both, only_a, only_b = int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum())
    neither = len(a) - both - only_a - only_b
    n = len(a)
    return {
        "pairs": n,
        "accuracy_a": (both + only_a) / n if n else None,
        "accuracy_b": (both + only_b) / n if n else None,
        "difference": (only_a - only_b) / n if n else None,
        "difference_ci95": list(paired_difference_ci(both, only_a, only_b, neither)),
        "both_correct": both,
        "only_a_correct": only_a,
        "only_b_correct": only_b,
        "both_wrong": neither,
        "mcnemar_p": mcnemar_exact(only_a, only_b),
    }
