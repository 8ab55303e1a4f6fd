"""Named grids of the accuracy study: the paper's Tables 4, 5, 7 and 9 in miniature, on CPU.

    python -m benchmarks.study --grid noise          # or lam, estimator, m, asam (benchmarks/study/grids.yaml)
    python -m benchmarks.study --grid noise --quick  # the grid's smoke run (what the tests run)

Each grid is a set of variants and axes (``noise``, ``lam``, ``normalization``, ``estimator``,
``m``); an axis applies to the variants it changes (``benchmarks.study.task.AXIS_USERS``), so SAM
runs once per noise level however many ``lam`` values RW-SAM tries. Every cell runs the same
seeds: seed ``s`` gives every variant the same initial weights, batch order and augmentation, so
"RW minus its SAM" (``pairs``) is a paired difference per seed. Runs are sequential, in this
process, on one torch thread. The task is ``benchmarks.study.task`` (few-shot digits).
Results: ``<out>/study_<grid>.json`` (rewritten after every run), ``.md`` and ``.png``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import platform
import statistics
import time
from typing import Any

import torch

from .task import AXIS_USERS, VARIANTS, Task, resolve_m, train_run

__all__ = ["GRIDS_FILE", "GridConfig", "load_grid", "cells", "summarize", "paired_differences", "run_grid", "grid_main"]

SCHEMA = "dist-sam-study-grid/1"
GRIDS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "grids.yaml")
_TASK_KEYS = tuple(f.name for f in dataclasses.fields(Task))
_NORMALIZATIONS, _ESTIMATORS = ("zscore", "mean", "none"), ("fd", "exact", "last_layer")


def _check_value(key: str, value: Any, b: int) -> None:
    ok = {"noise": lambda v: isinstance(v, (int, float)) and 0.0 <= v < 1.0,
          "lam": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0,
          "normalization": lambda v: v in _NORMALIZATIONS, "estimator": lambda v: v in _ESTIMATORS}
    if key == "m":
        resolve_m(value, b)
    elif key in ok and not ok[key](value):
        accepted = {"noise": "a fraction in [0, 1)", "lam": "a number >= 0", "normalization": _NORMALIZATIONS,
                    "estimator": _ESTIMATORS}[key]
        raise ValueError(f"grid axis {key!r}: got {value!r}; accepted: {accepted}")


@dataclasses.dataclass(kw_only=True)
class GridConfig:
    """One named grid (``benchmarks/study/grids.yaml``).

    Attributes:
        name: the grid's name; outputs are ``study_<name>.*`` (``study_<name>_quick.*`` in quick mode).
        description: what the grid asks, for the report.
        variants: names in ``benchmarks.study.task.VARIANTS``.
        axes: ``{axis: [values]}``; axes in ``AXIS_USERS``.
        pairs: ``[[rw_variant, baseline]]``: paired differences reported per cell of ``rw_variant``.
        seeds: seeds per cell (>= 2: a std needs two).
        task: the fixed settings (``benchmarks.study.task.Task`` fields).
        quick: a smoke run (marked in the results).
    """

    name: str
    description: str = ""
    variants: tuple[str, ...]
    axes: dict[str, tuple] = dataclasses.field(default_factory=dict)
    pairs: tuple[tuple[str, str], ...] = ()
    seeds: int = 5
    task: dict[str, Any] = dataclasses.field(default_factory=dict)
    quick: bool = False

    def __post_init__(self) -> None:
        self.variants = tuple(self.variants)
        self.axes = {k: tuple(v) for k, v in self.axes.items()}
        self.pairs = tuple(tuple(p) for p in self.pairs)
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"grid {self.name!r}: variants {list(self.variants)}: unknown {unknown}; accepted: {list(VARIANTS)}")
        bad_task = sorted(set(self.task) - set(_TASK_KEYS))
        if bad_task:
            raise ValueError(f"grid {self.name!r}: unknown task keys {bad_task}; accepted: {list(_TASK_KEYS)}")
        base = Task(**self.task)
        b = base.batch_size // base.workers_simulated
        if base.batch_size % base.workers_simulated or base.train_size < base.batch_size:
            raise ValueError(f"grid {self.name!r}: batch_size {base.batch_size} must split into {base.workers_simulated} "
                             f"workers and be <= train_size {base.train_size}")
        for key, values in self.axes.items():
            if key not in AXIS_USERS:
                raise ValueError(f"grid {self.name!r}: unknown axis {key!r}; accepted: {list(AXIS_USERS)}")
            if not values or not any(v in AXIS_USERS[key] for v in self.variants):
                raise ValueError(f"grid {self.name!r}: axis {key!r} needs values and one of the variants "
                                 f"{list(AXIS_USERS[key])} it changes")
            for value in values:
                _check_value(key, value, b)
        for key in ("noise", "lam", "normalization", "estimator", "m"):
            _check_value(key, getattr(base, key), b)
        for pair in self.pairs:
            if len(pair) != 2 or any(v not in self.variants for v in pair):
                raise ValueError(f"grid {self.name!r}: pair {list(pair)} must name two of its variants {list(self.variants)}")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 2:
            raise ValueError(f"grid {self.name!r}: seeds must be an integer >= 2 (a std needs two), got {self.seeds!r}")

    @property
    def stem(self) -> str:
        return f"study_{self.name}" + ("_quick" if self.quick else "")


_GRID_KEYS = tuple(f.name for f in dataclasses.fields(GridConfig) if f.name not in ("name", "quick"))


def load_grid(name: str, path: str | None = None, *, quick: bool = False, seeds: int | None = None) -> GridConfig:
    """The grid ``name`` of the YAML file (default :data:`GRIDS_FILE`), its ``quick:`` overrides applied with ``quick``.

    The file holds ``task:`` (defaults of every grid), ``quick:`` (``seeds`` and task overrides of
    every grid's smoke run) and ``grids: {name: {description, variants, axes, pairs, seeds, task,
    quick}}``; a grid's ``quick:`` may shrink its own axes too.
    """
    import yaml

    path = path or GRIDS_FILE
    with open(path) as fh:
        doc = yaml.safe_load(fh) or {}
    top = sorted(set(doc) - {"task", "quick", "tuning", "grids"})  # tuning: benchmarks.study.tuned
    if top:
        raise ValueError(f"{path}: unknown top-level keys {top}; accepted: ['task', 'quick', 'tuning', 'grids']")
    grids = doc.get("grids") or {}
    if name not in grids:
        raise ValueError(f"unknown grid {name!r}; accepted: {sorted(grids)}")
    spec = dict(grids[name])
    unknown = sorted(set(spec) - set(_GRID_KEYS) - {"quick", "tuned"})
    if unknown:
        raise ValueError(f"{path}: grid {name!r}: unknown keys {unknown}; accepted: {list(_GRID_KEYS) + ['quick', 'tuned']}")
    own_quick = spec.pop("quick", None) or {}
    spec.pop("tuned", None)  # benchmarks.study.tuned reads it
    spec["task"] = {**(doc.get("task") or {}), **(spec.get("task") or {})}
    if quick:
        for overrides in (doc.get("quick") or {}, own_quick):
            overrides = dict(overrides)
            spec["seeds"] = overrides.pop("seeds", spec.get("seeds", 5))
            spec["axes"] = {**(spec.get("axes") or {}), **overrides.pop("axes", {})}
            spec["task"].update(overrides)
    if seeds is not None:
        spec["seeds"] = seeds
    return GridConfig(name=name, quick=quick, **spec)


def cells(grid: GridConfig) -> list[tuple[str, dict[str, Any]]]:
    """``(variant, {axis: value})`` for every cell: the product of the axes each variant uses."""
    out = []
    for variant in grid.variants:
        used = [k for k in grid.axes if variant in AXIS_USERS[k]]
        for values in itertools.product(*(grid.axes[k] for k in used)):
            out.append((variant, dict(zip(used, values))))
    return out


def _cell_runs(runs: list[dict], variant: str, params: dict) -> list[dict]:
    return [r for r in runs if r["variant"] == variant and all(r["params"].get(k) == v for k, v in params.items())]


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(grid: GridConfig, runs: list[dict]) -> list[dict]:
    """Per cell: seeds done, test accuracy mean ± sample std, cost, and the estimator's error."""
    out = []
    for variant, params in cells(grid):
        rs = _cell_runs(runs, variant, params)
        acc, acc_std = _mean_std([r["test_acc"] for r in rs])
        cost, _ = _mean_std([r["cpu_s_per_epoch"] for r in rs])
        row = dict(variant=variant, params=params, n=len(rs), test_acc_mean=acc, test_acc_std=acc_std,
                   train_acc_mean=_mean_std([r["train_acc"] for r in rs])[0], cpu_s_per_epoch=cost,
                   m=rs[0]["m"] if rs else None)
        sgd = [r for r in runs if r["variant"] == "sgd" and r["params"].get("noise") == params.get("noise")]
        row["cost_ratio_vs_sgd"] = cost / _mean_std([r["cpu_s_per_epoch"] for r in sgd])[0] if sgd and rs else None
        if rs and "est_median_rel_error" in rs[0]:
            row["est_median_rel_error_mean"], row["est_median_rel_error_std"] = _mean_std([r["est_median_rel_error"] for r in rs])
            row["est_spearman_mean"], row["est_spearman_std"] = _mean_std([r["est_spearman"] for r in rs])
        out.append(row)
    return out


def paired_differences(grid: GridConfig, runs: list[dict]) -> list[dict]:
    """For each pair and each cell of its first variant: per-seed ``acc(rw) − acc(baseline)`` at the
    same seed and the same values of the axes the baseline uses; mean, sample std, standard error
    ``std / sqrt(n)``, and how many seeds the first variant won."""
    out = []
    for rw, base in grid.pairs:
        for variant, params in cells(grid):
            if variant != rw:
                continue
            base_params = {k: v for k, v in params.items() if base in AXIS_USERS[k]}
            by_seed = {r["seed"]: r["test_acc"] for r in _cell_runs(runs, base, base_params)}
            diffs = [(r["seed"], r["test_acc"] - by_seed[r["seed"]]) for r in _cell_runs(runs, rw, params) if r["seed"] in by_seed]
            diffs.sort()
            values = [d for _, d in diffs]
            mean, std = _mean_std(values)
            out.append(dict(variant=rw, baseline=base, params=params, n=len(values), seeds=[s for s, _ in diffs],
                            diffs=values, diff_mean=mean, diff_std=std,
                            diff_se=None if std is None else std / math.sqrt(len(values)),
                            wins=sum(d > 0 for d in values), ties=sum(d == 0 for d in values)))
    return out


def _result(grid: GridConfig, runs: list[dict], started: float, load: list[float], complete: bool) -> dict[str, Any]:
    from .task import __doc__ as task_doc

    notes = []
    if grid.quick:
        notes.append("Quick mode: a smoke run of the harness, not a result.")
    if "sgd" in grid.variants:
        notes.append("cpu_s_per_epoch is process CPU time on a machine shared with other jobs; compare it only as "
                     "the ratio to SGD of the same run (cost_ratio_vs_sgd).")
    return dict(schema=SCHEMA, name=grid.stem, grid=grid.name, complete=complete, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                wall_time_s=time.time() - started, config=dataclasses.asdict(grid), task=dataclasses.asdict(Task(**grid.task)),
                task_description=" ".join(task_doc.split("\n\n")[1:3]).replace("\n", " "),
                machine=dict(device="cpu", torch=torch.__version__, python=platform.python_version(), cpu_count=os.cpu_count(),
                             threads=1, processes=1, load_average=load, load_average_end=list(os.getloadavg()),
                             nice=os.nice(0)),
                variants=[dict(name=v, mapping=VARIANTS[v][2]) for v in grid.variants],
                runs=runs, summary=summarize(grid, runs), paired=paired_differences(grid, runs), notes=notes)


def run_grid(grid: GridConfig, out_dir: str, *, figures: bool = True, log=print) -> dict[str, Any]:
    """Run every (cell, seed) in turn; the JSON is rewritten after each run (``complete: false`` until the end)."""
    from . import plots as study_plots

    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, grid.stem)
    started, load = time.time(), list(os.getloadavg())
    tasks = [(v, p, s) for s in range(grid.seeds) for v, p in cells(grid)]  # seed-major: a cut run still pairs
    runs: list[dict] = []
    for i, (variant, params, seed) in enumerate(tasks):
        r = train_run(Task(**{**grid.task, **params}), variant, seed)
        r["params"] = params
        runs.append(r)
        log(f"[study {grid.name}] {i + 1}/{len(tasks)} {variant} {params} seed {seed}: test acc {100 * r['test_acc']:.2f}%, "
            f"{r['train_cpu_s']:.1f} cpu-s ({time.time() - started:.0f}s elapsed)")
        with open(stem + ".json", "w") as fh:
            json.dump(_result(grid, runs, started, load, complete=False), fh, indent=1)
    result = _result(grid, runs, started, load, complete=True)
    with open(stem + ".json", "w") as fh:
        json.dump(result, fh, indent=1)
    with open(stem + ".md", "w") as fh:
        fh.write(study_plots.grid_markdown(result))
    files = [stem + ".json", stem + ".md"]
    if figures:
        study_plots.grid_figure(result, stem + ".png")
        files.append(stem + ".png")
    result["files"] = files
    return result


def grid_main(name: str, path: str | None, *, quick: bool, seeds: int | None, out: str) -> int:
    """``python -m benchmarks.study --grid NAME``: run the grid, print its table; 2 on a bad grid."""
    import sys

    from .plots import grid_markdown

    try:
        grid = load_grid(name, path, quick=quick, seeds=seeds)
    except ValueError as err:
        print(f"benchmarks.study: {err}", file=sys.stderr)
        return 2
    result = run_grid(grid, out)
    print(grid_markdown(result))
    print("wrote " + ", ".join(result["files"]))
    return 0
