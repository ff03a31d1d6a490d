"""Entry point of the benchmark suite: `python -m benchmarks [--quick] [--json FILE] [--out DIR]`.

The implementation lives in the installed package (jaxrm/bench.py) so that `jaxrm bench` works
from an installed wheel too; this module only forwards to it.

    main(argv: list[str] | None = None) -> int
        argv without the program name, e.g. ["--quick", "--json", "out.json"]; None = sys.argv[1:].
        Returns the exit code. May re-exec the process once with tcmalloc preloaded
        (jaxrm.runtime.preload_tcmalloc; opt out with --no-tcmalloc or JAXRM_NO_TCMALLOC=1).
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from jaxrm.bench import main as bench_main
    return bench_main(argv)


if __name__ == "__main__":
    sys.exit(main())
