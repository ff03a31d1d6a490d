"""The benchmark's own pieces: plan memory from XLA's buffer assignment, one tiny case, the report."""

import argparse

from benchmarks.cases import Case, make_batch, model_config
from benchmarks.jaxrm_side import plan_memory, prepare_jax
from benchmarks.measure import run_case
from benchmarks.report import markdown


def test_tiny_case_plan_memory_and_report():
    case = Case("tiny", "tiny", 2, 32, "float32")
    args = argparse.Namespace(modes=["train", "score"], steps=2, score_steps=2, warmup=0, max_seconds=60.0)
    cfg = model_config(case)
    result = run_case(
        case, make_batch(cfg, case.pairs, case.T), args, {"peak_float32": 1e11}, {"jaxrm": prepare_jax}
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
