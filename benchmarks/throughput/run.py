"""The sweep: step time, throughput, all-reduce calls/bytes and peak memory of every SAM variant.

    dist-sam bench --config benchmarks/throughput/configs/cpu.yaml   # or: python -m benchmarks.throughput ...
    python -m benchmarks.throughput --config benchmarks/throughput/configs/quick.yaml --out /tmp/bench

For each world size in the config, ``n`` processes (gloo on CPU, NCCL on GPU) hold one DDP model
(``n = 1`` included: the same code path as ``torchrun --nproc_per_node=1``, so communication is
counted, not assumed) and one optimizer per variant on its parameters. Variants are interleaved:
each round runs ``steps_per_round`` steps of every variant in turn (the order rotates per round),
so a slow spell of a shared machine hits all of them alike; a variant's step time is the median
over its timed steps of the slowest rank. Ratios are against SGD measured in the same run.

``lr`` defaults to 0: the weights stay at their initialization so every variant is timed at the
same point (the base optimizer's arithmetic still runs). Inputs are synthetic, in memory: this
times the step, not the input pipeline. Outputs: ``<out>/<name>.json``, ``<name>.md`` and PNG
plots (``benchmarks.throughput.plots``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any

# Re-exported: the sweep's names are all found here (``benchmarks.throughput.run``).
from .config import DEFAULT_VARIANTS, RESULTS_DIR, BenchConfig, Variant, load_config, parse_variant
from .harness import PeakMemory, available_variants, make_step, measure, run_world
from .report import SCHEMA, checks, machine, scaling, summarize, write_result

__all__ = ["SCHEMA", "DEFAULT_VARIANTS", "RESULTS_DIR", "BenchConfig", "Variant", "parse_variant", "load_config", "make_step", "available_variants", "PeakMemory",
           "measure", "run_world", "summarize", "scaling", "checks", "machine", "run_sweep", "main"]


def run_sweep(cfg: BenchConfig, out_dir: str, plots: bool = True) -> dict[str, Any]:
    """Every world size, then the JSON, the markdown table and (optionally) the plots."""
    started = time.time()
    info = machine(cfg)
    records, skipped, method = [], {}, None
    for n in cfg.world_sizes:
        print(f"[bench] {cfg.name}: world size {n}, {len(cfg.variants)} variants ...", flush=True)
        ranks = run_world(cfg, n)
        records += summarize(cfg, n, ranks)
        skipped, method = ranks[0]["skipped"], ranks[0]["memory_method"]
        param_mb = ranks[0]["param_bytes"] / 2**20
    info["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result = dict(
        schema=SCHEMA, name=cfg.name, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), wall_time_s=time.time() - started,
        config=dataclasses.asdict(cfg), machine=info, model_param_mb=param_mb, memory_method=method, skipped=skipped,
        records=records, scaling=scaling(records), checks=checks(records),
    )
    result["files"] = write_result(result, out_dir, plots=plots)
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-sam bench",
                                description="Step time, img/s, all-reduce calls/bytes and peak memory per SAM variant.")
    p.add_argument("--config", default=None, help="YAML config (benchmarks/throughput/configs/*.yaml); defaults otherwise")
    p.add_argument("--out", default=RESULTS_DIR, help=f"output folder (default {RESULTS_DIR})")
    p.add_argument("--name", default=None, help="override the config's name (output file stem)")
    p.add_argument("--world-sizes", default=None, help="comma-separated, e.g. 1,2")
    p.add_argument("--variants", default=None, help="comma-separated variant names")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dist-sam bench`` and ``python -m benchmarks.throughput``."""
    args = _parser().parse_args(argv)
    split = lambda s, f=str: None if s is None else tuple(f(x) for x in s.split(",") if x)  # noqa: E731
    try:
        cfg = load_config(args.config, name=args.name, world_sizes=split(args.world_sizes, int),
                          variants=split(args.variants), steps=args.steps, threads=args.threads)
    except (ValueError, OSError) as err:
        print(f"dist-sam bench: {err}", file=sys.stderr)
        return 2
    result = run_sweep(cfg, args.out, plots=not args.no_plots)
    from .plots import markdown_table

    print(markdown_table(result))
    print("wrote " + ", ".join(result["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
