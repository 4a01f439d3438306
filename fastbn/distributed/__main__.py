"""``python -m fastbn.distributed --bench``: the benchmark of synchronized Batch
Normalization (:mod:`fastbn.bench.distributed`)."""
import sys

from ..bench.distributed import main

if __name__ == "__main__":
    sys.exit(main())
