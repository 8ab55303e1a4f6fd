"""Sections of the lent-GPU check that run in a process of their own, beside ``benchmarks/gpu_check.py``."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Callable

__all__ = ["section_main"]


def section_main(name: str, doc: str, run: Callable[[bool], dict[str, Any]], detail: str,
                 argv: list[str] | None = None) -> int:
    """The command line of one section: ``--out`` (default ``$OUT``) and ``--dry-run``; writes
    ``<out>/<name>_gpu_check.json``, prints the summary (without ``detail``), exits 1 unless ``ok``."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.gpu_checks.{name}", description=doc.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    result = run(args.dry_run)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{name}_gpu_check.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != detail}))
    return 0 if result["ok"] else 1
