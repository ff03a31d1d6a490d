"""Benchmarks of jaxrm against torchref; not part of the installed package (run from a checkout).

    python -m benchmarks [--quick] [--json FILE] [--out DIR] ...   throughput / MFU / memory
    python -m benchmarks.baseline_tfidf [--json [FILE]]             the TF-IDF accuracy baseline

run.py (flags, main) -> cases.py (what is measured) -> jaxrm_side.py / torch_side.py (each
library's steps) -> measure.py (timing, peak FLOP/s, memory, machine) -> report.py (JSON,
markdown, PNG). NOTES.md: every performance experiment, with its prediction and result.
"""
