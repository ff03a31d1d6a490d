"""The benchmark's own pieces: plan memory from XLA's buffer assignment, one tiny case, the report."""
import argparse

from jaxrm import bench


def test_tiny_case_plan_memory_and_report():
    case = bench.Case("tiny", "tiny", 2, 32, "float32")
    args = argparse.Namespace(modes=["train", "score"], steps=2, score_steps=2, warmup=0, max_seconds=60.0)
    cfg = bench.model_config(case)
    result = bench.run_case(case, bench.make_batch(cfg, case.pairs, case.T), args, {"peak_float32": 1e11},
                            {"jaxrm": bench.prepare_jax})
    for mode in ("train", "score"):
        r = result["jaxrm"][mode]
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1

    memory = bench.plan_memory("tiny", 16, 64, plans=(("on", "none"), ("on", "block")))
    stored, recomputed = (r["temp_mb"] for r in memory)
    assert recomputed < 0.85 * stored  # recomputation really frees memory (81 -> 61 MB when measured)

    report = {"machine": {}, "peaks": {}, "results": [{"case": vars(case), "jaxrm": result["jaxrm"]}],
              "plan_memory": memory}
    md = bench.markdown(report)
    assert "| tiny | float32 | 2x32 | train |" in md and "| on | block |" in md
