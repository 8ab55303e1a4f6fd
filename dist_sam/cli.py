"""The ``dist-sam`` command: ``dist-sam <subcommand> [args]``.

Subcommands:
    make-demo-data DIR ...   write the built-in digits dataset (or synthetic JPEGs)
    train ...                the training entry point (same as ``python launch/train.py``)
    demo                     2-process torchrun training on the built-in data
    bench ...                the benchmark harness (``python -m benchmarks.throughput``)
    export-checkpoint D OUT  a checkpoint's weights (DDP or FSDP2) as one plain state dict
"""

from __future__ import annotations

import importlib
import os
import sys

__all__ = ["main"]

_COMMANDS = {
    "make-demo-data": "dist_sam.data.demo:main",
    "train": "dist_sam.train.cli:main",
    "demo": "dist_sam.train.demo:main",
    "bench": "benchmarks.throughput.run:main",
    "export-checkpoint": "dist_sam.train.export:main",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in _COMMANDS:
        print(f"dist-sam: unknown command {name!r}; accepted: {sorted(_COMMANDS)}", file=sys.stderr)
        return 2
    module, func = _COMMANDS[name].split(":")
    if module.startswith("benchmarks."):  # benchmarks/ sits beside dist_sam/ in a checkout, not installed
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if os.path.isdir(os.path.join(root, "benchmarks")) and root not in sys.path:
            sys.path.insert(0, root)
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
