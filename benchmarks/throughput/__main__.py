"""``python -m benchmarks.throughput``: the sweep (:mod:`benchmarks.throughput.run`)."""

import sys

from .run import main

sys.exit(main())
