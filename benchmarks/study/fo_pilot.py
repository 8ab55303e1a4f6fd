"""A pilot of first-order m-SAM on the cost grid's noisy task, paired with the grid's saved runs.

    python -m benchmarks.study.fo_pilot [--noise 0.4] [--out benchmarks/results]

For ``msam-fo b/2`` and ``msam-fo b/4`` (:data:`benchmarks.study.cost.METHODS`): the grid's ``rho``
values on seed 0, the best by validation accuracy (first of equals) on seeds 1-4, exactly as the
cost grid with ``tune_seeds=1`` runs a method (:func:`benchmarks.study.cost_run.train_cost_run`).
The test accuracies are paired by seed with SAM-local and m-SAM b/2, b/4 rerun here at the settings
``benchmarks/results/study_cost.json`` selected (its saved runs do not reproduce bit for bit on
this machine and code: m-SAM b/2 seed 0 gives 87.39% against the saved 88.47%), and with the saved
runs too. Not the frontier: no timing phase, one noise level, 1-seed tuning. Writes
``<out>/msam_fo_pilot.json`` and prints the paired differences; ``--reuse`` keeps the pilot runs of
an existing file and reruns only what is missing.
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
COMPARE = ("sam-local", "m-sam b/2", "m-sam b/4")


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


def rerun(method: str, params: dict, noise: float, log=print) -> list[dict]:
    """``method`` at ``params`` on every seed, here."""
    cfg = CostConfig(tune_seeds=1)
    spec = {k: v for k, v in METHODS[method].items() if k != "tune"}
    out = []
    for seed in range(cfg.seeds):
        out.append(dict(train_cost_run(cfg.task_for(noise), spec, params, seed, val_size=cfg.val_size), method=method, noise=noise))
        log(f"[fo pilot] rerun {method} {params} seed {seed}: test {100 * out[-1]['test_acc']:.2f}%")
    return out


def paired_with(runs: list[dict], theirs: dict[int, float], other: str, setting: str) -> dict:
    """Mean ± standard error of (pilot − ``other``) test accuracy in points, paired by seed."""
    rho = runs[-1]["params"]["rho"]
    diffs = [100 * (r["test_acc"] - theirs[r["seed"]]) for r in runs if r["params"]["rho"] == rho and r["seed"] in theirs]
    return dict(vs=other, setting=setting, n=len(diffs), mean=statistics.mean(diffs),
                se=statistics.stdev(diffs) / len(diffs) ** 0.5, wins=sum(d > 0 for d in diffs), diffs=diffs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.study.fo_pilot", description=__doc__.split("\n\n")[0])
    p.add_argument("--noise", type=float, default=0.4)
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.add_argument("--reuse", action="store_true", help="keep the runs of an existing msam_fo_pilot.json")
    args = p.parse_args(argv)
    with open(os.path.join("benchmarks", "results", "study_cost.json")) as fh:
        grid = json.load(fh)
    path = os.path.join(args.out, "msam_fo_pilot.json")
    old = json.load(open(path)) if args.reuse and os.path.exists(path) else {}
    result = dict(schema="dist-sam-msam-fo-pilot/2", noise=args.noise, runs=[], reruns=[], paired={}, paired_saved={})
    for other in COMPARE:
        sel = next(s for s in grid["selected"] if s["method"] == other and s["noise"] == args.noise)
        mine = [r for r in old.get("reruns", []) if r["method"] == other] or rerun(other, sel["params"], args.noise)
        result["reruns"] += mine
    for method in PILOT:
        runs = [r for r in old.get("runs", []) if r["method"] == method] or pilot(method, args.noise)
        result["runs"] += runs
        result["paired"][method], result["paired_saved"][method] = [], []
        for other in COMPARE:
            sel = next(s for s in grid["selected"] if s["method"] == other and s["noise"] == args.noise)
            here = {r["seed"]: r["test_acc"] for r in result["reruns"] if r["method"] == other}
            result["paired"][method].append(paired_with(runs, here, other, sel["setting"]))
            result["paired_saved"][method].append(paired_with(runs, dict(zip(sel["seeds"], sel["test_acc"])), other,
                                                              sel["setting"]))
        for label, rows in (("rerun here", result["paired"][method]), ("saved grid", result["paired_saved"][method])):
            for d in rows:
                print(f"{method} (rho={runs[-1]['params']['rho']}) - {d['vs']} ({d['setting']}, {label}): "
                      f"{d['mean']:+.2f} ± {d['se']:.2f} points, {d['wins']}/{d['n']} wins")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
