"""`jaxrm eval`'s text output: the report of one run, or the comparison of two, as readable tables."""

from __future__ import annotations

BASE_KEYS = ("loss", "margin", "chosen_mean", "chosen_std", "rejected_mean", "rejected_std")


def _num(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(interval) -> str:
    return f"[{interval[0]:.4f}, {interval[1]:.4f}]"


def _length_lines(r: dict) -> list[str]:
    rows = [
        f"{'length bias':<24} Spearman(reward, tokens) {_num(r['length_correlation'])} "
        f"over {2 * r['pairs']} texts",
        f"{'  chosen longer':<24} accuracy {_num(r['accuracy_chosen_longer'])} on "
        f"{r['pairs_chosen_longer']} pairs, mean margin {_num(r['margin_chosen_longer'])}",
        f"{'  chosen shorter':<24} accuracy {_num(r['accuracy_chosen_shorter'])} on "
        f"{r['pairs_chosen_shorter']} pairs, mean margin {_num(r['margin_chosen_shorter'])}",
        f"{'  same length':<24} {r['pairs_same_length']} pairs",
        f"{'  margin vs length diff':<24} Spearman {_num(r['margin_length_correlation'])}",
    ]
    return rows


def _subset_lines(r: dict) -> list[str]:
    if not r.get("subsets"):
        return []
    width = max(24, *(len(name) + 2 for name in r["subsets"]))
    rows = [f"{'subset':<{width}} {'accuracy':>8}  {'95% CI':<18} {'pairs':>6}"]
    for name, s in r["subsets"].items():
        rows.append(
            f"{'  ' + name:<{width}} {s['accuracy']:8.4f}  {_ci(s['accuracy_ci95']):<18} {s['pairs']:>6}"
        )
    for section, score in r.get("rewardbench", {}).items():
        rows.append(f"{'  RewardBench ' + section:<{width}} {score:8.4f}")
    return rows


def format_report(r: dict) -> str:
    """One run's eval result (jaxrm.evaluate.report plus "data", "data_source") as a table."""
    rows = [
        f"{'data':<24} {r['data']} ({r['data_source']})",
        f"{'pairs':<24} {r['pairs']}",
        f"{'accuracy':<24} {_num(r['accuracy'])}  95% CI {_ci(r['accuracy_ci95'])} (Wilson); "
        f"ties {r['ties']} (counted wrong)",
    ]
    rows += [f"{key:<24} {_num(r[key])}" for key in BASE_KEYS]
    rows += _length_lines(r)
    rows.append(
        f"{'calibration':<24} ECE {_num(r['ece'])} (sigmoid(chosen - rejected), 10 bins, both orders)"
    )
    rows += _subset_lines(r)
    return "\n".join(rows)


def format_comparison(c: dict) -> str:
    """Two runs' comparison (jaxrm.evaluate.compare plus "data", "runs", "a", "b") as a table."""
    a, b = c["runs"]
    width = max(24, len(a) + 2, len(b) + 2)
    rows = [
        f"{'data':<{width}} {c['data']} ({c['data_source']}), {c['pairs']} pairs scored by both",
        f"{'run':<{width}} {'accuracy':>8}  {'95% CI':<18} {'loss':>7} {'ECE':>7} {'len corr':>8}",
    ]
    for name, r in ((a, c["a"]), (b, c["b"])):
        rows.append(
            f"{name:<{width}} {_num(r['accuracy']):>8}  {_ci(r['accuracy_ci95']):<18} {_num(r['loss']):>7} "
            f"{_num(r['ece']):>7} {_num(r['length_correlation'], 3):>8}"
        )
    rows += [
        f"{'difference (a - b)':<{width}} {_num(c['difference']):>8}  {_ci(c['difference_ci95'])} "
        "(paired, Newcombe)",
        f"{'disagreements':<{width}} only a right {c['only_a_correct']}, only b right {c['only_b_correct']}; "
        f"McNemar exact p = {c['mcnemar_p']:.4g}",
    ]
    return "\n".join(rows)
