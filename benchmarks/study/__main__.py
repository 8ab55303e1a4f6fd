"""``python -m benchmarks.study``: see :mod:`benchmarks.study`."""

import sys

from .cli import main

sys.exit(main())
