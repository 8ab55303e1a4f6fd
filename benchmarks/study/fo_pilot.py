"""A pilot of first-order m-SAM on the cost grid's noisy task, paired with the grid's saved runs.

    python -m benchmarks.study.fo_pilot [--noise 0.4] [--out benchmarks/results]

For ``msam-fo b/2`` and ``msam-fo b/4`` (:data:`benchmarks.study.cost.METHODS`): the grid's ``rho``
values on seed 0, the best by validation accuracy (first of equals) on seeds 1-4, exactly as the
cost grid with ``tune_seeds=1`` runs a method (:func:`benchmarks.study.cost_run.train_cost_run`).
The test accuracies are paired by seed with the selected runs of ``benchmarks/results/study_cost.json``
(same task, seeds and tuning). Not the frontier: no timing phase, one noise level, 1-seed tuning.
Writes ``<out>/msam_fo_pilot.json`` and prints the paired differences.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from .cost import METHODS, CostConfig
from .cost_run import train_cost_run

__all__ = ["pilot", "paired_with", "main"]

PILOT = ("msam-fo b/2", "msam-fo b/4")


def pilot(method: str, noise: float, log=print) -> list[dict]:
    cfg = CostConfig(tune_seeds=1)
    spec = {k: v for k, v in METHODS[method].items() if k != "tune"}
    runs: list[dict] = []

    def run(rho: float, seed: int) -> None:
        r = train_cost_run(cfg.task_for(noise), spec, {"rho": rho}, seed, val_size=cfg.val_size)
        runs.append(dict(r, method=method, noise=noise))
        log(f"[fo pilot] {method} rho={rho} seed {seed}: val {100 * r['val_acc']:.1f}% test {100 * r['test_acc']:.2f}%")

    for rho in cfg.rho:
        run(rho, 0)
    best = max(runs, key=lambda r: r["val_acc"])["params"]["rho"]  # max keeps the first of equals
    for seed in range(1, cfg.seeds):
        run(best, seed)
    return runs


def paired_with(runs: list[dict], grid: dict, other: str, noise: float) -> dict:
    """Mean ± standard error of (pilot − ``other``) test accuracy in points, paired by seed."""
    sel = next(s for s in grid["selected"] if s["method"] == other and s["noise"] == noise)
    theirs = dict(zip(sel["seeds"], sel["test_acc"]))
    rho = runs[-1]["params"]["rho"]
    diffs = [100 * (r["test_acc"] - theirs[r["seed"]]) for r in runs if r["params"]["rho"] == rho and r["seed"] in theirs]
    return dict(vs=other, setting=sel["setting"], n=len(diffs), mean=statistics.mean(diffs),
                se=statistics.stdev(diffs) / len(diffs) ** 0.5, wins=sum(d > 0 for d in diffs), diffs=diffs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.study.fo_pilot", description=__doc__.split("\n\n")[0])
    p.add_argument("--noise", type=float, default=0.4)
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = p.parse_args(argv)
    with open(os.path.join("benchmarks", "results", "study_cost.json")) as fh:
        grid = json.load(fh)
    result = dict(schema="dist-sam-msam-fo-pilot/1", noise=args.noise, runs=[], paired={})
    for method in PILOT:
        runs = pilot(method, args.noise)
        result["runs"] += runs
        result["paired"][method] = [paired_with(runs, grid, o, args.noise) for o in ("sam-local", "m-sam b/2", "m-sam b/4")]
        for d in result["paired"][method]:
            print(f"{method} (rho={runs[-1]['params']['rho']}) - {d['vs']} ({d['setting']}): {d['mean']:+.2f} ± {d['se']:.2f} "
                  f"points, {d['wins']}/{d['n']} wins")
    path = os.path.join(args.out, "msam_fo_pilot.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
