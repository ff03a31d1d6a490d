"""Throughput, MFU and memory of jaxrm vs torchref on the same shapes and data, each in its own
process as its users run it (benchmarks/sides.py), timed interleaved.

    python -m benchmarks [--quick] [--json FILE] [--out DIR] [...]     (or: jaxrm bench ...)

    main(argv: list[str] | None = None) -> int
        argv without the program name, e.g. ["--quick", "--json", "out.json"]; None = sys.argv[1:].
        Returns the exit code.

For every case (benchmarks/cases.py) it measures, for jaxrm (jit; benchmarks/jaxrm_side.py) and
torchref (eager, or torch.compile'd blocks with --torch-compile; benchmarks/torch_side.py),
  train    one optimizer step on a pair batch (forward, pairwise loss, backward, clip, AdamW)
  score    the forward pass to per-pair end scores (inference, no loss)
  rewards  the forward pass to the reward at every position (what the original's forward computes)
the median tokens/s over repeated steps after warm-up (compile time and the first step are
reported apart), the spread, peak memory and MFU (benchmarks/measure.py), and writes
bench.json, bench.md and bench.png (benchmarks/report.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax

from benchmarks import report
from benchmarks.cases import Case, cases_for, make_batch, matmul_params, model_config
from benchmarks.jaxrm_side import plan_memory, prepare_jax
from benchmarks.measure import machine_info, measure_peaks, run_case
from benchmarks.report import best_torch
from benchmarks.sides import InProcess, start_workers, variants
from benchmarks.torch_side import prepare_torch

MODES = report.MODES


def parse_args(argv):
    """The flags, with the defaults that depend on --quick filled in."""
    p = argparse.ArgumentParser(prog="jaxrm bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny + a reduced small case, float32 (< 2 minutes)")
    p.add_argument("--json", metavar="FILE", help="write the full report here (default OUT/bench.json)")
    p.add_argument("--out", metavar="DIR", default="bench_results", help="directory for bench.json/.md/.png")
    p.add_argument(
        "--configs", nargs="+", default=["tiny", "small", "gpt2"], choices=["tiny", "small", "gpt2"]
    )
    p.add_argument(
        "--dtypes",
        nargs="+",
        default=None,
        choices=["float32", "bfloat16"],
        help="default: float32 bfloat16 on CPU, bfloat16 on GPU/TPU",
    )
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--no-seqlen", dest="seqlen", action="store_false", help="skip T=128..1024 scaling")
    p.add_argument("--no-short", dest="short", action="store_false", help="skip many short pairs (64 x T=64)")
    p.add_argument(
        "--no-plan-memory",
        dest="plan_memory",
        action="store_false",
        help="skip the train-step memory of each remat/scan plan (gpt2, compile only)",
    )
    p.add_argument("--no-torch", action="store_true", help="jaxrm only")
    p.add_argument("--torch-compile", action="store_true", help="also torchref with torch.compile'd blocks")
    p.add_argument("--steps", type=int, default=None, help="timed train steps per case")
    p.add_argument("--score-steps", type=int, default=None, help="timed scoring calls per case")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after the first call")
    p.add_argument(
        "--max-seconds", type=float, default=None, help="stop timing a case after this long (>= 3 steps)"
    )
    p.add_argument(
        "--no-tcmalloc",
        action="store_true",
        help="no +tcmalloc rows (with --in-process: no re-exec with tcmalloc; also JAXRM_NO_TCMALLOC=1)",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="the older method: jaxrm and torchref in this one process (one allocator, one set of threads)",
    )
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.seqlen = args.short = args.plan_memory = False
    args.steps = args.steps or (5 if args.quick else 7)
    args.score_steps = args.score_steps or (7 if args.quick else 10)
    args.warmup = 1 if args.warmup is None else args.warmup
    if args.max_seconds is None:
        args.max_seconds = 15.0 if args.quick else 120.0
    return args


def _torch_importable() -> bool:
    try:
        import torch  # noqa: F401  (optional: pip install 'jaxrm[torch]')

        import torchref  # noqa: F401
    except ImportError:
        print("torch not installed: measuring jaxrm only (pip install 'jaxrm[torch]')", file=sys.stderr)
        return False
    return True


def _sides(args, with_torch: bool) -> dict:
    """name -> what runs it: a worker process per variant (default), or this process (--in-process)."""
    if not args.in_process:
        specs = variants(with_torch, tcmalloc_rows=not args.no_tcmalloc, torch_compile=args.torch_compile)
        os.makedirs(args.out, exist_ok=True)
        return start_workers(specs, os.path.join(args.out, "workers.log"))
    sides = {"jaxrm": InProcess(prepare_jax, jax.devices()[0])}
    if with_torch:
        sides["torchref"] = InProcess(prepare_torch)
        if args.torch_compile:
            sides["torchref+compile"] = InProcess(lambda c, b, m: prepare_torch(c, b, m, compiled=True))
    return sides


def _print_case(case: Case, entry: dict, modes: list[str]) -> None:
    for mode in modes:
        j = entry["jaxrm"][mode]
        t = entry.get("torchref", {}).get(mode)
        msg = (
            f"{case.name:>11} {case.dtype:>8} {mode:>5}: jaxrm {j['tokens_per_s']:9.0f} tok/s "
            f"(first {j['first_step_s']:.1f}s, spread {j['spread_pct']:.0f}%)"
        )
        if t:
            msg += (
                f" | torchref {t['tokens_per_s']:9.0f} tok/s (spread {t['spread_pct']:.0f}%)"
                f" | ratio {j['tokens_per_s'] / t['tokens_per_s']:.2f}x"
            )
        best = best_torch(entry, mode)
        if best and best[0] != "torchref":
            msg += f" | vs best torch ({best[0]}) {j['tokens_per_s'] / best[1]:.2f}x"
        print(msg, flush=True)


def run_cases(args, machine: dict, peaks: dict, sides: dict) -> list[dict]:
    """Every case in turn: measured, printed, and saved to OUT/bench.partial.json."""
    results = []
    for case in cases_for(args):
        cfg = model_config(case)
        batch = make_batch(cfg, case.pairs, case.T)
        entry = {
            "case": dataclasses.asdict(case)
            | {"tokens_per_step": case.tokens, "matmul_params": matmul_params(cfg)}
        }
        entry.update(run_case(case, batch, args, peaks, sides))
        results.append(entry)
        _print_case(case, entry, args.modes)
        report.write_partial(args.out, machine, peaks, results)
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns a process exit code. argv: the flags, without the program name."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.dtypes is None:
        args.dtypes = ["float32", "bfloat16"] if jax.default_backend() == "cpu" else ["bfloat16"]
    with_torch = not args.no_torch and _torch_importable()

    t_start = time.perf_counter()
    machine = machine_info()
    print(
        f"# {machine['cpu']} x{machine['cpu_count']}, jax {machine['jax']} ({machine['jax_backend']}), "
        f"allocator {machine['allocator']}",
        flush=True,
    )
    peaks = measure_peaks(args.quick, with_torch)
    print(
        "# peak FLOP/s: "
        + ", ".join(f"{k}={v / 1e9:.0f}G" for k, v in peaks.items() if isinstance(v, float)),
        flush=True,
    )
    machine["method"] = "one process" if args.in_process else "a process per implementation"
    sides = _sides(args, with_torch)
    try:
        results = run_cases(args, machine, peaks, sides)
    finally:
        for side in sides.values():
            side.close()
    memory = plan_memory("gpt2", 4, 512) if args.plan_memory and "gpt2" in args.configs else []
    full = {
        "machine": machine,
        "peaks": peaks,
        "args": {k: v for k, v in vars(args).items()},
        "results": results,
        "plan_memory": memory,
        "wall_s": time.perf_counter() - t_start,
    }
    report.write(full, args.out, args.json, with_plot=not args.no_plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
