"""SAM-local/SGD and SAM-global/SGD step-time ratios at world size 2 on CPU (a preset of ``run``).

    python -m benchmarks.throughput.ddp                 # ResNet-18, 32px, batch 32/worker, 20+ steps
    python -m benchmarks.throughput.ddp --strict        # exit 1 when local exceeds 2.05x SGD

Runs ``benchmarks/throughput/configs/ddp.yaml`` through the sweep harness (2 gloo processes, 1 thread each,
variants interleaved, median of the slowest rank's step times) and writes
``benchmarks/results/ddp.json`` (the sweep's schema plus ``ddp_ratios``) and ``ddp.md``.
Target (SPEC.md §5): SAM-local at most 2.05x SGD; SAM-global pays a second all-reduce.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..common import output
from .config import RESULTS_DIR, load_config
from .run import run_sweep

__all__ = ["CONFIG", "LOCAL_TARGET", "ddp_ratios", "main"]

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "ddp.yaml")
LOCAL_TARGET = 2.05


def ddp_ratios(result: dict, world_size: int = 2) -> dict:
    """``{"sam-local/sgd": r, "sam-global/sgd": r, "local_target": 2.05, "local_ok": bool, ...}``."""
    at = {r["variant"]: r for r in result["records"] if r["world_size"] == world_size}
    out = {f"{v}/sgd": at[v]["step_time_ratio_vs_sgd"] for v in ("sam-local", "sam-global") if v in at}
    out.update({f"{v}/sgd bytes": at[v]["allreduce_bytes_ratio_vs_sgd"] for v in ("sam-local", "sam-global") if v in at})
    out.update(world_size=world_size, local_target=LOCAL_TARGET,
               local_ok=None if "sam-local/sgd" not in out else out["sam-local/sgd"] <= LOCAL_TARGET)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput.ddp", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=RESULTS_DIR)
    p.add_argument("--config", default=CONFIG, help="override the preset (e.g. benchmarks/throughput/configs/quick.yaml)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--strict", action="store_true", help="exit 1 if SAM-local/SGD exceeds the target")
    args = p.parse_args(argv)
    cfg = load_config(args.config, world_sizes=(2,), variants=("sgd", "sam-local", "sam-global"), steps=args.steps)
    result = run_sweep(cfg, args.out, plots=False)
    ratios = result["ddp_ratios"] = ddp_ratios(result)
    path = output.write_json({k: v for k, v in result.items() if k != "files"}, os.path.join(args.out, f"{cfg.name}.json"))
    n = result["config"]["steps"]
    print(f"world size 2, {cfg.model} {cfg.image_size}px, batch {cfg.batch_size}/worker, median of {n}+ steps:")
    verdict = "met" if ratios["local_ok"] else "MISSED"
    print(f"  SAM-local / SGD  = {ratios.get('sam-local/sgd', float('nan')):.3f}  (target <= {LOCAL_TARGET}: {verdict})")
    print(f"  SAM-global / SGD = {ratios.get('sam-global/sgd', float('nan')):.3f}")
    print(f"wrote {path}")
    return 1 if args.strict and not ratios["local_ok"] else 0


if __name__ == "__main__":
    sys.exit(main())
