"""python -m benchmarks [--quick] [--json FILE] [--out DIR] ...  (see benchmarks/run.py)"""

import sys

from jaxrm import runtime

if "--in-process" in sys.argv[1:] and "--no-tcmalloc" not in sys.argv[1:]:
    runtime.setup()  # before JAX loads: may re-exec this process with tcmalloc preloaded

from benchmarks.run import main  # noqa: E402  (imports JAX: after the allocator is chosen)

sys.exit(main())
