"""The benchmark's own pieces: plan memory from XLA's buffer assignment, one tiny case (in this
process and in worker processes), the report; jaxrm's malloc tuning at import."""

import argparse
import json
import os
import subprocess
import sys

from benchmarks.cases import Case, make_batch, model_config
from benchmarks.jaxrm_side import plan_memory, prepare_jax
from benchmarks.measure import run_case
from benchmarks.report import markdown
from benchmarks.sides import InProcess, start_workers, variants


def test_tiny_case_plan_memory_and_report():
    case = Case("tiny", "tiny", 2, 32, "float32")
    args = argparse.Namespace(modes=["train", "score"], steps=2, score_steps=2, warmup=0, max_seconds=60.0)
    cfg = model_config(case)
    result = run_case(
        case,
        make_batch(cfg, case.pairs, case.T),
        args,
        {"peak_float32": 1e11},
        {"jaxrm": InProcess(prepare_jax)},
    )
    for mode in ("train", "score"):
        r = result["jaxrm"][mode]
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1

    memory = plan_memory("tiny", 16, 64, plans=(("on", "none"), ("on", "block")))
    stored, recomputed = (r["temp_mb"] for r in memory)
    assert recomputed < 0.85 * stored  # recomputation really frees memory (81 -> 61 MB when measured)

    report = {
        "machine": {},
        "peaks": {},
        "results": [{"case": vars(case), "jaxrm": result["jaxrm"]}],
        "plan_memory": memory,
    }
    md = markdown(report)
    assert "| tiny | float32 | 2x32 | train |" in md and "| on | block |" in md


def test_each_implementation_runs_in_its_own_process(tmp_path):
    """The default method: jaxrm and torchref in worker processes of their own, timed from here."""
    case = Case("tiny", "tiny", 2, 16, "float32")
    args = argparse.Namespace(modes=["train", "rewards"], steps=2, score_steps=2, warmup=0, max_seconds=60.0)
    sides = start_workers(variants(True, tcmalloc_rows=False, torch_compile=False), str(tmp_path / "w.log"))
    try:
        batch = make_batch(model_config(case), case.pairs, case.T)
        result = run_case(case, batch, args, {"peak_float32": 1e11}, sides)
    finally:
        for side in sides.values():
            side.close()
    processes = {name: result[name]["train"]["process"] for name in ("jaxrm", "torchref")}
    assert processes["jaxrm"]["pid"] != processes["torchref"]["pid"] != os.getpid()
    assert processes["jaxrm"]["malloc_tuning"] and not processes["torchref"]["malloc_tuning"]
    for name in ("jaxrm", "torchref"):
        for mode in ("train", "rewards"):
            assert result[name][mode]["steps"] == 2 and result[name][mode]["tokens_per_s"] > 0


def _tuning_in_a_fresh_process(**env):
    code = "import json, jaxrm.runtime as r, jaxrm; print(json.dumps(r.malloc_tuning_applied()))"
    plain = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # the system allocator
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**plain, **env})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_import_jaxrm_tunes_glibc_malloc_unless_opted_out():
    assert _tuning_in_a_fresh_process(JAXRM_MALLOC_TUNING="1") == [
        "M_ARENA_MAX",
        "M_MMAP_MAX",
        "M_TRIM_THRESHOLD",
        "M_TOP_PAD",
    ]
    assert _tuning_in_a_fresh_process(JAXRM_MALLOC_TUNING="0") == []
