"""One implementation of the benchmark in a process of its own:

    python -m benchmarks.worker jaxrm|torchref|torchref+compile

It reads one JSON command per line on stdin and answers each with one JSON line on stdout
(anything else the libraries print goes to stderr):
    {"cmd": "prepare", "case": {...Case fields}, "mode": "train"|"score"|"rewards", "warmup": N}
        -> {"first_step_s", "peak_rss_mb", "added_mb", "memory_method", ...info, "process": {...}}
    {"cmd": "step"}     -> {"s": seconds of one step, timed here}
    {"cmd": "release"}  -> {}   (drops the prepared step and its memory)
A failure answers {"error": "..."}; end of input ends the process. The batch is made here from
the case (benchmarks/cases.make_batch, seeded), the same as every other process makes it.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback

from benchmarks.cases import Case, make_batch, model_config
from benchmarks.timing import start


def _prepare_function(impl: str):
    """prepare(case, batch, mode) -> (one, info) of `impl`, and the device whose memory to read."""
    if impl == "jaxrm":
        import jax  # here, not at the top: the torch worker never imports JAX

        from benchmarks.jaxrm_side import prepare_jax

        return prepare_jax, jax.devices()[0]
    from benchmarks.torch_side import prepare_torch

    compiled = impl == "torchref+compile"
    return (lambda case, batch, mode: prepare_torch(case, batch, mode, compiled=compiled)), None


def process_info() -> dict:
    """What this process runs with: allocator (LD_PRELOAD), jaxrm's malloc tuning, threads."""
    info = {"pid": os.getpid(), "ld_preload": os.environ.get("LD_PRELOAD", "")}
    if "jaxrm.runtime" in sys.modules:
        info["malloc_tuning"] = sys.modules["jaxrm.runtime"].malloc_tuning_applied()
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    return info


def _answer(command: dict, state: dict, prepare, device) -> dict:
    if command["cmd"] == "prepare":
        case = Case(**command["case"])
        batch = make_batch(model_config(case), case.pairs, case.T)
        one, first, mem, info = start(prepare, case, batch, command["mode"], command["warmup"], device)
        state["one"] = one
        memory = {"peak_rss_mb": mem.peak_mb, "added_mb": mem.added_mb, "memory_method": mem.method}
        return {"first_step_s": first, **memory, **info, "process": process_info()}
    if command["cmd"] == "step":
        t0 = time.perf_counter()
        state["one"]()
        return {"s": time.perf_counter() - t0}
    if command["cmd"] == "release":
        state.pop("one", None)
        gc.collect()
        return {}
    raise ValueError(f"unknown command {command['cmd']!r}")


def main(impl: str) -> int:
    replies = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol's channel
    os.dup2(2, 1)  # whatever else is printed goes to stderr
    prepare, device = _prepare_function(impl)
    state = {}
    for line in sys.stdin:
        try:
            reply = _answer(json.loads(line), state, prepare, device)
        except Exception as e:  # reported to the parent, which decides
            traceback.print_exc()
            reply = {"error": f"{type(e).__name__}: {e}"[:500]}
        replies.write(json.dumps(reply) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
