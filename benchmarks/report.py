"""The outputs: bench.json (everything), bench.md (the tables) and bench.png (the plot).

report = {"machine": machine_info(), "peaks": measure_peaks(), "args": the flags,
          "results": [{"case": ..., "jaxrm": {mode: figures}, "torchref": ...}, ...],
          "plan_memory": plan_memory() rows, "wall_s": seconds}
"""

from __future__ import annotations

import contextlib
import json
import os

import numpy as np

PARTIAL_JSON = "bench.partial.json"  # rewritten after each case: partial results survive an interrupted run
MODES = ("train", "score", "rewards")
TORCH_VARIANTS = ("torchref", "torchref+tcmalloc", "torchref+compile")
VARIANTS = ("jaxrm", "jaxrm+tcmalloc", *TORCH_VARIANTS)


def best_torch(entry: dict, mode: str) -> tuple[str, float] | None:
    """(name, tokens/s) of the fastest torch variant measured for this case and mode."""
    rates = {
        name: entry[name][mode]["tokens_per_s"]
        for name in TORCH_VARIANTS
        if "tokens_per_s" in entry.get(name, {}).get(mode, {})
    }
    return max(rates.items(), key=lambda item: item[1]) if rates else None


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def _fmt(x, nd=0):
    return "-" if x is None else f"{x:,.{nd}f}"


def _header(report: dict) -> list[str]:
    m = report["machine"]
    p = report["peaks"]
    rates = ", ".join(
        f"{k} {v / 1e9:.0f} G" for k, v in p.items() if k.split("_")[0] in ("numpy", "jax", "torch")
    )
    return [
        f"Machine: {m.get('cpu')} ({m.get('cpu_count')} cores, {m.get('mem_gb')} GB), JAX {m.get('jax')} "
        f"({m.get('jax_backend')}), torch {m.get('torch', '-')}, {m.get('method', 'one process')}, "
        f"{m.get('date')}.",
        f"Peak FLOP/s (matmul {p.get('matmul_n')}^2): float32 {_fmt(p.get('peak_float32', 0) / 1e9)} G "
        f"({p.get('peak_float32_source')}), bfloat16 {_fmt(p.get('peak_bfloat16', 0) / 1e9)} G "
        f"({p.get('peak_bfloat16_source')}). " + rates,
        "",
        "| case | dtype | pairs x T | mode | jaxrm tok/s (min-max) | torchref tok/s (min-max) | ratio | "
        "jaxrm MFU | torch MFU | jaxrm compile s | jaxrm first step s | jaxrm / torch peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]


def _tok_s(r: dict) -> str:
    return f"{_fmt(r['tokens_per_s'])} ({_fmt(r['tokens_per_s_min'])}-{_fmt(r['tokens_per_s_max'])})"


def _case_rows(r: dict) -> list[str]:
    """One table row per mode: jaxrm against torchref eager (each as run by default)."""
    c = r["case"]
    j = r.get("jaxrm", {})
    rows = []
    for mode in MODES:
        jm = j.get(mode)
        tm = r.get("torchref", {}).get(mode)
        if jm is not None:
            ratio = jm["tokens_per_s"] / tm["tokens_per_s"] if tm else None
            rows.append(
                f"| {c['name']} | {c['dtype']} | {c['pairs']}x{c['T']} | {mode} | {_tok_s(jm)} | "
                + (_tok_s(tm) if tm else "-")
                + f" | {'-' if ratio is None else f'**{ratio:.2f}x**'} | "
                f"{_pct(jm.get('mfu'))} | {_pct(tm.get('mfu') if tm else None)} | "
                f"{_fmt(jm.get('compile_s'), 1)} | {jm['first_step_s']:.1f} | "
                f"{_fmt(jm.get('added_mb'))} / {_fmt(tm.get('added_mb') if tm else None)} |"
            )
    return rows


def _variants_table(results: list[dict]) -> list[str]:
    """tokens/s of every variant measured (benchmarks/sides.py) and jaxrm against the best torch."""
    present = [v for v in VARIANTS if any(v in r for r in results)]
    if present == ["jaxrm", "torchref"] or len(present) < 2:
        return []
    lines = [
        "",
        "Every variant (tokens/s, median); best = jaxrm against the fastest torch variant:",
        "",
        "| case | dtype | mode | " + " | ".join(present) + " | jaxrm / best torch |",
        "|---" * (len(present) + 4) + "|",
    ]
    for r in results:
        for mode in MODES:
            cells = [_fmt(r.get(v, {}).get(mode, {}).get("tokens_per_s")) for v in present]
            best, jm = best_torch(r, mode), r.get("jaxrm", {}).get(mode)
            if jm is None:
                continue
            ratio = f"**{jm['tokens_per_s'] / best[1]:.2f}x** ({best[0]})" if best else "-"
            c = r["case"]
            lines.append(f"| {c['name']} | {c['dtype']} | {mode} | " + " | ".join(cells) + f" | {ratio} |")
    return lines


def _plan_memory_table(memory: list[dict]) -> list[str]:
    r0 = memory[0]
    lines = [
        "",
        f"Train-step memory by execution plan, {r0['preset']} {r0['pairs']}x{r0['T']} float32 "
        "(XLA buffer assignment of the compiled step; params + optimizer state are the arguments):",
        "",
        "| scan_layers | remat | temporaries MB | arguments MB | compile s |",
        "|---|---|---|---|---|",
    ]
    return lines + [
        f"| {r['scan_layers']} | {r['remat']} | {_fmt(r['temp_mb'])} | "
        f"{_fmt(r['argument_mb'])} | {r['compile_s']:.1f} |"
        for r in memory
    ]


def markdown(report: dict) -> str:
    """bench.md: machine and peaks, the throughput table, the plan-memory table (when measured)."""
    lines = _header(report)
    for r in report["results"]:
        lines += _case_rows(r)
    lines += _variants_table(report["results"])
    lines.append("")
    lines.append(
        "tok/s: median over timed steps after warm-up (min-max in brackets); "
        "ratio = jaxrm / torchref; score = end scores, rewards = the reward at every position; "
        "compile = trace, lower and XLA compile (ahead of time); "
        "first step = the first run after it, its one-off costs included; "
        "peak MB = peak RSS added during the case."
    )
    if report.get("plan_memory"):
        lines += _plan_memory_table(report["plan_memory"])
    return "\n".join(lines)


def _throughput_panel(ax, main: list[dict], mode: str) -> None:
    """Bars: tokens/s of each implementation per main case, min-max as error bars, log scale."""
    labels = [
        f"{r['case']['name']}\n{r['case']['dtype'].replace('float', 'f').replace('bfloat', 'bf')}"
        for r in main
    ]
    impls = [i for i in VARIANTS if any("tokens_per_s" in r.get(i, {}).get(mode, {}) for r in main)]
    w = 0.8 / max(1, len(impls))
    x = np.arange(len(main))
    for k, impl in enumerate(impls):
        vals = [r.get(impl, {}).get(mode, {}).get("tokens_per_s", 0) for r in main]
        lo = [v - r.get(impl, {}).get(mode, {}).get("tokens_per_s_min", v) for v, r in zip(vals, main)]
        hi = [r.get(impl, {}).get(mode, {}).get("tokens_per_s_max", v) - v for v, r in zip(vals, main)]
        ax.bar(x + (k - (len(impls) - 1) / 2) * w, vals, w, yerr=[lo, hi], label=impl, capsize=2)
    ax.set_xticks(x, labels)
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s (median, min-max)")
    ax.set_title(f"{mode} step")
    ax.legend()


def _seqlen_panel(ax, seq: list[dict]) -> None:
    """Lines: tokens/s against T for the sequence-length cases."""
    Ts = [r["case"]["T"] for r in seq]
    for impl in ("jaxrm", "torchref"):
        for mode, style in (("train", "-o"), ("score", "--s")):
            vals = [r.get(impl, {}).get(mode, {}).get("tokens_per_s") for r in seq]
            if all(v is not None for v in vals):
                ax.plot(Ts, vals, style, label=f"{impl} {mode}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("T (small model, ~2048 tokens/step)")
    ax.set_ylabel("tokens/s")
    ax.set_title("sequence-length scaling")
    ax.legend(fontsize=8)


def plot(report: dict, path: str) -> None:
    """bench.png: train and score throughput per case; sequence-length scaling when measured."""
    import matplotlib  # lazily: only when a plot is asked for

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in report["results"] if r["case"]["group"] == "main"]
    seq = [r for r in report["results"] if r["case"]["group"] == "seqlen"]
    modes = [m for m in MODES if any(m in r.get("jaxrm", {}) for r in main)]
    fig, axes = plt.subplots(1, len(modes) + bool(seq), figsize=(5.2 * (len(modes) + bool(seq)), 4.2))
    for ax, mode in zip(axes, modes):
        _throughput_panel(ax, main, mode)
    if seq:
        _seqlen_panel(axes[-1], seq)
    m = report["machine"]
    fig.suptitle(f"jaxrm vs torchref on {m.get('cpu')} x{m.get('cpu_count')} ({m.get('date')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_partial(out_dir: str, machine: dict, peaks: dict, results: list[dict]) -> None:
    """OUT/bench.partial.json with the cases done so far."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, PARTIAL_JSON), "w") as f:
        json.dump({"machine": machine, "peaks": peaks, "results": results}, f, indent=1)


def write(report: dict, out_dir: str, json_path: str | None, with_plot: bool) -> None:
    """bench.json (at json_path, default OUT/bench.json), OUT/bench.md, OUT/bench.png; prints the
    tables and where they went; removes the partial JSON."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = json_path or os.path.join(out_dir, "bench.json")
    if os.path.dirname(json_path):
        os.makedirs(os.path.dirname(json_path), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    with contextlib.suppress(FileNotFoundError):  # superseded by the full report
        os.remove(os.path.join(out_dir, PARTIAL_JSON))
    md = markdown(report)
    with open(os.path.join(out_dir, "bench.md"), "w") as f:
        f.write(md + "\n")
    if with_plot:
        plot(report, os.path.join(out_dir, "bench.png"))
    print()
    print(md)
    print(
        f"\n# wrote {json_path}, {out_dir}/bench.md"
        + (f", {out_dir}/bench.png" if with_plot else "")
        + f" in {report['wall_s']:.0f}s"
    )
