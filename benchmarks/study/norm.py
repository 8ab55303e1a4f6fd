"""Why m-SAM at m = 1 does not train here: the same run with BatchNorm, GroupNorm and no norm layer.

    python -m benchmarks.study.norm [--quick] [--seeds 2]   # -> benchmarks/results/study_m1_norm.{json,md}

The task and model are the grids' (``benchmarks.study.task``: few-shot digits, ``SmallCNN``), with
the BatchNorm layers swapped for ``GroupNorm(8, C)`` or removed (:func:`~benchmarks.study.cost_run.build_model`);
every variant starts from the same conv weights for a seed. m-SAM runs batched (``micro_impl="vmap"``,
the loop's math). A BatchNorm model is evaluated three ways: with its running statistics (eval mode,
what every table reports), with the test batch's statistics, and with **each sample normalized by
its own statistics**, the function an m = 1 descent step differentiates (BN over one sample).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch import nn

from .cost_run import train_model
from .plain import RESULTS_DIR
from .task import Task, _accuracy

__all__ = ["per_sample_bn_accuracy", "run_norm", "main"]

CELLS = (("bn", "b/16"), ("bn", "b/4"), ("gn", "b/16"), ("gn", "b/4"), ("none", "b/16"), ("none", "b/4"))


def per_sample_bn_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch: bool) -> float:
    """Accuracy with BatchNorm in training mode (batch statistics), running statistics untouched:
    over the whole of ``x`` (``batch=True``) or over each sample alone (``batch=False``)."""
    from dist_sam.bn import frozen_running_stats

    model.train()
    with torch.no_grad(), frozen_running_stats(model):
        logits = model(x) if batch else torch.cat([model(x[i:i + 1]) for i in range(len(x))])
    model.eval()
    return float((logits.argmax(1) == y).float().mean())


def run_norm(seeds: int, task: Task, out_dir: str, name: str, log=print) -> dict:
    """Train every cell of :data:`CELLS` on ``seeds`` seeds; write ``<name>.json`` and ``.md``."""
    runs, started = [], time.time()
    for seed in range(seeds):
        for norm, m in CELLS:
            t = Task(**{**vars(task), "m": m})
            model, data, info = train_model(t, dict(opt="sam", m=m, micro_impl="vmap"), dict(rho=task.rho), seed,
                                            val_size=0, norm=norm)
            r = dict(norm=norm, m=m, seed=seed, train_cpu_s=info["train_cpu_s"],
                     test_acc_eval=_accuracy(model, data["x_test"], data["y_test"]),
                     train_acc_eval=_accuracy(model, data["x_train"], data["y_train"]))
            if norm == "bn":
                r["test_acc_batch_stats"] = per_sample_bn_accuracy(model, data["x_test"], data["y_test"], batch=True)
                r["test_acc_per_sample_stats"] = per_sample_bn_accuracy(model, data["x_test"], data["y_test"], batch=False)
            runs.append(r)
            log(f"[study norm] {norm} m={m} seed {seed}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in r.items() if "acc" in k)
                + f" ({info['train_cpu_s']:.0f} cpu-s, {time.time() - started:.0f}s)")
    result = dict(schema="dist-sam-study-norm/1", name=name, task=vars(task), runs=runs, wall_time_s=time.time() - started,
                  description=__doc__.split("\n\n")[2].replace("\n", " "))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, name + ".json"), "w") as fh:
        json.dump(result, fh, indent=1)
    with open(os.path.join(out_dir, name + ".md"), "w") as fh:
        fh.write(markdown(result))
    return result


def markdown(result: dict) -> str:
    """Mean test accuracy per cell and evaluation (over the seeds run)."""
    keys = ("test_acc_eval", "test_acc_batch_stats", "test_acc_per_sample_stats", "train_acc_eval")
    lines = [f"## `{result['name']}`: m-SAM at m = 1 with BatchNorm, GroupNorm and no norm", "", result["description"], "",
             "| norm | m | seeds | test acc, eval mode | test acc, test-batch BN stats | test acc, per-sample BN stats | "
             "train acc (its labels) |", "|---|---|---|---|---|---|---|"]
    for norm, m in CELLS:
        rs = [r for r in result["runs"] if r["norm"] == norm and r["m"] == m]
        if not rs:
            continue
        cells = [f"{100 * sum(r[k] for r in rs) / len(rs):.1f}" if k in rs[0] else "-" for k in keys]
        lines.append(f"| {norm} | {m} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.study.norm``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.study.norm", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="1 seed, 1 short epoch on a tiny task: a smoke run")
    p.add_argument("--out", default=RESULTS_DIR)
    p.add_argument("--rho", type=float, default=Task.rho, help=f"SAM's rho (default {Task.rho}); another value "
                   "writes study_m1_norm_rho<rho>")
    args = p.parse_args(argv)
    if args.seeds < 1:
        print(f"benchmarks.study.norm: --seeds must be >= 1, got {args.seeds}", file=sys.stderr)
        return 2
    if not args.rho > 0:
        print(f"benchmarks.study.norm: --rho must be > 0, got {args.rho}", file=sys.stderr)
        return 2
    task = Task(train_size=100, epochs=1, batch_size=64, width=8, rho=args.rho) if args.quick else Task(rho=args.rho)
    name = "study_m1_norm" + ("" if args.rho == Task.rho else f"_rho{args.rho:g}") + ("_quick" if args.quick else "")
    result = run_norm(1 if args.quick else args.seeds, task, args.out, name)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
