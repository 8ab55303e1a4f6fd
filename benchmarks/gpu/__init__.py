"""The lent-GPU check: ``benchmarks/gpu_check.sh`` runs ``deepspeed_fp16`` in a process of its own, then
``check`` (the sections of ``sections`` and ``fsdp``), all in at most 8 minutes; ``--dry-run`` runs
the same code, tiny, on the CPU (the tests do).

:func:`section_main` is the command line of a section that runs in a process of its own.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Callable

from ..common.output import write_json

__all__ = ["section_main"]


def section_main(name: str, doc: str, run: Callable[[bool], dict[str, Any]], detail: str,
                 argv: list[str] | None = None) -> int:
    """The command line of one section: ``--out`` (default ``$OUT``) and ``--dry-run``; writes
    ``<out>/<name>_gpu_check.json``, prints the summary (without ``detail``), exits 1 unless ``ok``."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.gpu.{name}", description=doc.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    result = run(args.dry_run)
    write_json(result, os.path.join(args.out, f"{name}_gpu_check.json"))
    print(json.dumps({k: v for k, v in result.items() if k != detail}))
    return 0 if result["ok"] else 1
