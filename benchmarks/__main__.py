"""python -m benchmarks [--quick] [--json FILE] [--out DIR] ...  (see jaxrm/bench.py)"""
import sys

from benchmarks.run import main

sys.exit(main())
