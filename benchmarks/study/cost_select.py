"""Tuning and reporting of the cost grid: the best setting by validation, paired differences, budgets.

Selection never looks at the test set: for each method and noise level the setting with the
highest mean **validation** accuracy over the tuning seeds wins (ties: the first in grid order),
and test accuracy is then reported at that setting over every seed.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

__all__ = ["setting_key", "settings_table", "select", "paired", "budget_table"]


def setting_key(params: dict) -> str:
    """A stable name of a setting, e.g. ``alpha=0.3,rho=0.1``."""
    return ",".join(f"{k}={params[k]}" for k in sorted(params)) or "-"


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _runs(runs: list[dict], method: str, noise: float, params: dict | None = None) -> list[dict]:
    return [r for r in runs if r["method"] == method and r["noise"] == noise
            and (params is None or setting_key(r["params"]) == setting_key(params))]


def settings_table(runs: list[dict], method: str, noise: float, settings: list[dict], tune_seeds: list[int]) -> list[dict]:
    """Per setting: validation and test accuracy mean ± std over the tuning seeds."""
    rows = []
    for params in settings:
        rs = [r for r in _runs(runs, method, noise, params) if r["seed"] in tune_seeds]
        val, val_std = _mean_std([r["val_acc"] for r in rs])
        test, test_std = _mean_std([r["test_acc"] for r in rs])
        rows.append(dict(params=params, n=len(rs), val_acc_mean=val, val_acc_std=val_std, test_acc_mean=test,
                         test_acc_std=test_std, finite=all(r["finite"] for r in rs)))
    return rows


def select(runs: list[dict], method: str, noise: float, settings: list[dict], tune_seeds: list[int]) -> dict[str, Any] | None:
    """The setting with the best mean validation accuracy over ``tune_seeds`` (all of them run), its
    test accuracy over every seed run at it, and the grid it was chosen from."""
    table = settings_table(runs, method, noise, settings, tune_seeds)
    complete = [row for row in table if row["n"] == len(tune_seeds)]
    if not complete:
        return None
    best = max(complete, key=lambda row: row["val_acc_mean"])  # max keeps the first of equal values
    rs = sorted(_runs(runs, method, noise, best["params"]), key=lambda r: r["seed"])
    test, test_std = _mean_std([r["test_acc"] for r in rs])
    val, _ = _mean_std([r["val_acc"] for r in rs])
    at_edge = {k: v in (min(s[k] for s in settings), max(s[k] for s in settings)) and len({s[k] for s in settings}) > 1
               for k, v in best["params"].items()}
    return dict(method=method, noise=noise, params=best["params"], setting=setting_key(best["params"]), selected_by="val_acc",
                n=len(rs), seeds=[r["seed"] for r in rs], test_acc=[r["test_acc"] for r in rs], test_acc_mean=test,
                test_acc_std=test_std, val_acc_mean=val, at_grid_edge=[k for k, e in at_edge.items() if e],
                finite=all(r["finite"] for r in rs), grid=table, cpu_s=statistics.mean(r["train_cpu_s"] for r in rs))


def paired(selected: list[dict], baseline: str) -> list[dict]:
    """Each method at its selected setting minus ``baseline`` at its own, per seed (same seed: same
    data order, initialization and shifts), per noise level: mean, SE, wins."""
    out = []
    for noise in sorted({s["noise"] for s in selected}):
        base = next((s for s in selected if s["method"] == baseline and s["noise"] == noise), None)
        if base is None:
            continue
        by_seed = dict(zip(base["seeds"], base["test_acc"]))
        for s in selected:
            if s["noise"] != noise or s["method"] == baseline:
                continue
            diffs = [a - by_seed[seed] for seed, a in zip(s["seeds"], s["test_acc"]) if seed in by_seed]
            mean, std = _mean_std(diffs)
            out.append(dict(method=s["method"], baseline=baseline, noise=noise, n=len(diffs), diffs=diffs, diff_mean=mean,
                            diff_se=None if std is None else std / math.sqrt(len(diffs)), wins=sum(d > 0 for d in diffs)))
    return out


def budget_table(selected: list[dict], cost: dict[str, float], budgets: tuple[float, ...]) -> list[dict]:
    """For each noise level and budget X (step time × SGD): the method of highest mean test
    accuracy (at its validation-selected setting) among those with a measured cost <= X."""
    out = []
    for noise in sorted({s["noise"] for s in selected}):
        for x in budgets:
            fits = [s for s in selected if s["noise"] == noise and s["method"] in cost and cost[s["method"]] <= x]
            if not fits:
                continue
            best = max(fits, key=lambda s: s["test_acc_mean"])
            out.append(dict(noise=noise, budget=x, method=best["method"], setting=best["setting"], cost=cost[best["method"]],
                            test_acc_mean=best["test_acc_mean"], test_acc_std=best["test_acc_std"]))
    return out
