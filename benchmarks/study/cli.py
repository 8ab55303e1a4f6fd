"""``python -m benchmarks.study``: the plain m-sharpness study, or a named grid with ``--grid``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .plain import QUICK, RESULTS_DIR, VARIANTS, StudyConfig, run_study

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.study``: the m-sharpness study, or a named grid with ``--grid``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.study", description="The m-sharpness accuracy study on the digits demo data.")
    p.add_argument("--quick", action="store_true", help="2 seeds, 2 epochs: a smoke run (<= 3 minutes)")
    p.add_argument("--out", default=RESULTS_DIR, help=f"output folder (default {RESULTS_DIR})")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--nsam-epochs", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="processes (1 thread each); default 2")
    p.add_argument("--variants", default=None, help=f"comma-separated subset of {list(VARIANTS)}")
    p.add_argument("--name", default=None)
    p.add_argument("--grid", default=None, help="run a named grid (noise, lam, estimator, m, asam, cost) instead, "
                   "sequentially on 1 thread; --seeds and --quick apply")
    p.add_argument("--grid-config", default=None, help="the grids' YAML (default benchmarks/study/grids.yaml)")
    p.add_argument("--phase", default="all", help="--grid cost only: all, accuracy (the training runs) or time (the timing phase)")
    p.add_argument("--tune-seeds", type=int, default=None, help="--grid cost only: seeds the whole tuning grid runs on (default 2)")
    p.add_argument("--resume", action="store_true", help="--grid cost or --tuned: keep the runs of an existing JSON, run the missing ones")
    p.add_argument("--tuned", action="store_true", help="--grid NAME (not cost): every cell tuned on a validation split "
                   "(benchmarks.study.tuned); --workers processes")
    args = p.parse_args(argv)
    if args.grid == "cost":
        from .cost import cost_main

        return cost_main(quick=args.quick, seeds=args.seeds, out=args.out, phase=args.phase, resume=args.resume,
                         workers=args.workers, tune_seeds=args.tune_seeds)
    if args.grid is not None and args.tuned:
        from .tuned import tuned_main

        return tuned_main(args.grid, args.grid_config, quick=args.quick, seeds=args.seeds, out=args.out,
                          workers=args.workers, resume=args.resume)
    if args.grid is not None:
        from .grid import grid_main

        return grid_main(args.grid, args.grid_config, quick=args.quick, seeds=args.seeds, out=args.out)
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    for key in ("seeds", "epochs", "nsam_epochs", "workers", "name"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.variants:
        values["variants"] = tuple(args.variants.split(","))
    try:
        cfg = StudyConfig(**values)
    except ValueError as err:
        print(f"benchmarks.study: {err}", file=sys.stderr)
        return 2
    result = run_study(cfg, args.out)
    from .plain_plots import study_markdown

    print(study_markdown(result))
    print("wrote " + ", ".join(result["files"]))
    return 0
