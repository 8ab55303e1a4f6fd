"""First-order m-SAM's two exact forms timed against m-SAM, SAM-local and SGD, interleaved, one run.

    python -m benchmarks.study.fo_time [--rounds 7] [--steps 20] [--out benchmarks/results]

The cost grid's task and timing (:func:`benchmarks.study.cost_time.time_methods`: every method its
own model, rounds in rotating order, each method's step time over SGD's in the same round, the
median over rounds), for ``msam-fo`` at ``m = b/2`` and ``b/4`` in both forms (``vmap``: all group
gradients at once; ``loop``: one double backward per group) beside m-SAM (vmap and loop) at the same
``m``, SAM-local and SGD. Writes ``<out>/msam_fo_time.json`` and prints the ratios. A shared,
loaded machine moves both sides of a ratio together, not the ratios' noise: rerun on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from .cost import METHODS, CostConfig
from .cost_time import time_methods

__all__ = ["NAMES", "time_first_order", "main"]

NAMES = ("sgd", "sam-local", "m-sam b/2", "m-sam b/4", "msam-fo b/2", "msam-fo b/4")


def time_first_order(*, rounds: int, steps: int, warmup: int, rho: float = 0.1, task: dict | None = None,
                     log=print) -> dict:
    """Every method of :data:`NAMES` and the loop twin of each ``vmap`` one, timed in one interleaved run."""
    cfg = CostConfig(**({} if task is None else {"task": task}))
    specs = {n: {k: v for k, v in METHODS[n].items() if k != "tune"} for n in NAMES}
    for n in [n for n in NAMES if specs[n].get("micro_impl") == "vmap"]:
        specs[n + " (loop)"] = dict(specs[n], micro_impl="loop")
    params = {n: {"rho": rho} for n in specs}
    task_ = cfg.task_for(max(cfg.noise))
    timing = time_methods(task_, specs, params, val_size=cfg.val_size, rounds=rounds, steps=steps, warmup=warmup, log=log)
    return dict(schema="dist-sam-msam-fo-time/1", created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), methods=specs,
                task=vars(task_), machine=dict(torch=torch.__version__, python=platform.python_version(),
                                               cpu_count=os.cpu_count(), threads=1, load_average=list(os.getloadavg())),
                timing=timing)


def table(result: dict) -> str:
    rows = ["| method | step / SGD | per round | forward / step | backward / step | calls / step |", "|---|---|---|---|---|---|"]
    for name, r in result["timing"]["methods"].items():
        rows.append(f"| {name} | {r['ratio_vs_sgd']:.2f} | {' '.join(f'{x:.2f}' for x in r['ratio_per_round'])} | "
                    f"{r['forward_per_step']:.2f} | {r['backward_per_step']:.2f} | {r['forward_calls_per_step']:.0f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.study.fo_time", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = p.parse_args(argv)
    result = time_first_order(rounds=args.rounds, steps=args.steps, warmup=args.warmup)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "msam_fo_time.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    print(table(result))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
