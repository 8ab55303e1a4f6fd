"""The accuracy-per-cost frontier: ``python -m benchmarks.study --grid cost``.

    python -m benchmarks.study --grid cost [--quick] [--resume]   # accuracy runs, then the timing phase
    python -m benchmarks.study --grid cost --phase time           # only the timing (rerun it on a quiet machine)

Every method of :data:`METHODS` is tuned on the validation split (``benchmarks.study.cost_run``):
``rho`` for each, ``alpha`` for LookSAM and look-m-SAM, ``lam`` for RW-SAM (``k`` is part of the
method). With ``tune_seeds`` set, the whole tuning grid runs on the first ``tune_seeds`` seeds and
the chosen setting on the rest (:mod:`benchmarks.study.cost_select`). A selection on an edge of
its grid extends that edge (:func:`tuned_grid`: rho and lam halved or doubled, alpha halved or
moved half-way to 1) up to ``extend`` times per key, so a reported best lies inside its grid or is
marked as still on an edge; ``--resume`` runs only the settings an extension adds. Every seed gives every method
the same data order, initialization and shifts, so differences are paired by seed. Cost: step time
relative to SGD from the interleaved timing phase (:mod:`benchmarks.study.cost_time`), passes per
step counted in the accuracy runs. Results: ``<out>/study_cost.json`` (rewritten after every run),
``.md`` and ``.png``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import torch

from .cost_run import train_cost_run
from .cost_select import budget_table, paired, select, setting_key
from .task import Task

__all__ = ["METHODS", "CostConfig", "QUICK", "settings", "run_cost", "cost_main"]

SCHEMA = "dist-sam-study-cost/1"
#: method -> its spec (``benchmarks.study.cost_run``) and the hyperparameters it is tuned over
METHODS: dict[str, dict[str, Any]] = {
    "sgd": dict(opt="sgd", tune=()),
    "sam-local": dict(opt="sam", m="b", micro_impl="vmap", tune=("rho",)),
    "m-sam b/2": dict(opt="sam", m="b/2", micro_impl="vmap", tune=("rho",)),
    "m-sam b/4": dict(opt="sam", m="b/4", micro_impl="vmap", tune=("rho",)),
    "m-sam b/8": dict(opt="sam", m="b/8", micro_impl="vmap", tune=("rho",)),
    "interval k=2": dict(opt="sam", m="b/4", interval=2, micro_impl="vmap", tune=("rho",)),
    "interval k=4": dict(opt="sam", m="b/4", interval=4, micro_impl="vmap", tune=("rho",)),
    "looksam k=2": dict(opt="looksam", m="b", k=2, tune=("rho", "alpha")),
    "looksam k=5": dict(opt="looksam", m="b", k=5, tune=("rho", "alpha")),
    "looksam k=10": dict(opt="looksam", m="b", k=10, tune=("rho", "alpha")),
    "look-m-sam k=2": dict(opt="looksam", m="b/4", k=2, tune=("rho", "alpha")),
    "look-m-sam k=5": dict(opt="looksam", m="b/4", k=5, tune=("rho", "alpha")),
    "look-m-sam k=10": dict(opt="looksam", m="b/4", k=10, tune=("rho", "alpha")),
    "rwsam fd": dict(opt="rwsam", m="b", tune=("rho", "lam")),
    "msam-fo b/2": dict(opt="msam-fo", m="b/2", micro_impl="vmap", tune=("rho",)),  # first-order m-SAM
    "msam-fo b/4": dict(opt="msam-fo", m="b/4", micro_impl="vmap", tune=("rho",)),
}


@dataclasses.dataclass(kw_only=True)
class CostConfig:
    """The cost grid's settings (defaults: the full run)."""

    methods: tuple[str, ...] = tuple(METHODS)
    noise: tuple[float, ...] = (0.0, 0.4)
    seeds: int = 5
    tune_seeds: int | None = 2  # the whole grid on the first 2 seeds, the chosen setting on the rest; None: all
    val_size: int = 300
    rho: tuple[float, ...] = (0.05, 0.1, 0.2)
    look_rho: tuple[float, ...] = (0.05, 0.1)  # LookSAM and look-m-SAM: crossed with alpha
    alpha: tuple[float, ...] = (0.3, 0.7)
    lam: tuple[float, ...] = (0.5,)
    extend: int = 2  # a selection on a grid edge extends that edge (see extend_value), up to 2 times per key
    task: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(width=16))  # the grids' task, a narrower CNN
    workers: int = 1
    time_rounds: int = 7
    time_steps: int = 20
    time_warmup: int = 5
    budgets: tuple[float, ...] = (1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 1e9)
    quick: bool = False

    def __post_init__(self) -> None:
        for key in ("methods", "noise", "rho", "look_rho", "alpha", "lam", "budgets"):
            setattr(self, key, tuple(getattr(self, key)))
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or "sgd" not in self.methods:
            raise ValueError(f"CostConfig.methods: unknown {unknown} (accepted: {list(METHODS)}); 'sgd' must be one of them")
        if self.seeds < 2 or (self.tune_seeds is not None and not 1 <= self.tune_seeds <= self.seeds):
            raise ValueError(f"CostConfig: seeds must be >= 2 and tune_seeds in [1, seeds] or None, got {self.seeds}, {self.tune_seeds}")
        if self.val_size < 10 or self.val_size % 10:
            raise ValueError(f"CostConfig.val_size must be a positive multiple of 10 (10 classes), got {self.val_size}")
        for key in ("rho", "look_rho", "alpha", "lam"):
            if not getattr(self, key) or any(v <= 0 for v in getattr(self, key)):
                raise ValueError(f"CostConfig.{key} must be a non-empty list of positive values, got {getattr(self, key)}")
        if isinstance(self.extend, bool) or not isinstance(self.extend, int) or self.extend < 0:
            raise ValueError(f"CostConfig.extend must be an integer >= 0, got {self.extend!r}")
        Task(**self.task)

    @property
    def name(self) -> str:
        return "study_cost" + ("_quick" if self.quick else "")

    def task_for(self, noise: float) -> Task:
        return Task(**{**self.task, "noise": noise})


#: the smoke run: every method, a two-point tuning grid, a few steps on a tiny task
QUICK = dict(seeds=2, val_size=50, rho=(0.05, 0.2), look_rho=(0.05,), alpha=(0.3, 0.7), lam=(0.5,), time_rounds=2, time_steps=4,
             time_warmup=2, extend=0, task=dict(train_size=100, epochs=1, max_steps_per_epoch=2, batch_size=32, width=8), quick=True)


def _values(cfg: CostConfig, method: str) -> dict[str, tuple[float, ...]]:
    look = METHODS[method]["opt"] == "looksam"
    return {k: tuple(cfg.look_rho if k == "rho" and look else getattr(cfg, k)) for k in METHODS[method]["tune"]}


def _product(values: dict[str, tuple[float, ...]]) -> list[dict]:
    return [dict(zip(values, combo)) for combo in itertools.product(*values.values())]


def settings(cfg: CostConfig, method: str) -> list[dict]:
    """The starting tuning grid of ``method``: the product of the values of the hyperparameters it tunes."""
    return _product(_values(cfg, method))


def extend_value(key: str, value: float, low: bool) -> float:
    """The next value past a grid edge: half or double; LookSAM's ``alpha`` stays in (0, 1)
    (halved toward 0, half-way toward 1)."""
    if key == "alpha" and not low:
        return round((1.0 + value) / 2, 6)
    return round(value / 2 if low else value * 2, 6)


def tuned_grid(cfg: CostConfig, runs: list[dict], method: str, noise: float) -> list[dict]:
    """``method``'s tuning grid at ``noise`` once its edges are extended: while the selection (on the
    tuning seeds) sits on an edge of a key extended fewer than ``cfg.extend`` times, that key gains the
    value past it. Replayed from ``runs``, so it holds settings still to run (the next to run)."""
    values, tune = _values(cfg, method), list(range(cfg.tune_seeds or cfg.seeds))
    extended = dict.fromkeys(values, 0)
    while True:
        grid = _product(values)
        best = select(runs, method, noise, grid, tune)
        if best is None or any(r["n"] < len(tune) for r in best["grid"]):
            return grid  # settings not run yet on every tuning seed: run them first
        grow = [k for k in best["at_grid_edge"] if extended[k] < cfg.extend]
        if not grow:
            return grid
        for k in grow:
            v = best["params"][k]
            values[k] = tuple(sorted({*values[k], extend_value(k, v, low=v == min(values[k]))}))
            extended[k] += 1


def _key(r: dict) -> tuple:
    return r["method"], r["noise"], setting_key(r["params"]), r["seed"]


def _one(args: tuple) -> dict:
    cfg_dict, method, noise, params, seed = args
    cfg = CostConfig(**cfg_dict)
    spec = {k: v for k, v in METHODS[method].items() if k != "tune"}
    r = train_cost_run(cfg.task_for(noise), spec, params, seed, val_size=cfg.val_size)
    return dict(r, method=method, noise=noise)


def _execute(cfg: CostConfig, jobs: list[tuple], runs: list[dict], save, log) -> None:
    done = {_key(r) for r in runs}
    jobs = [j for j in jobs if (j[0], j[1], setting_key(j[2]), j[3]) not in done]
    cfg_dict, started = dataclasses.asdict(cfg), time.time()
    if cfg.workers > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_one, (cfg_dict, *j)) for j in jobs]
            results = (f.result() for f in as_completed(futures))
            _collect(results, runs, len(jobs), started, save, log)
    else:
        _collect((_one((cfg_dict, *j)) for j in jobs), runs, len(jobs), started, save, log)


def _collect(results, runs: list[dict], total: int, started: float, save, log) -> None:
    for i, r in enumerate(results):
        runs.append(r)
        save()
        log(f"[study cost] {i + 1}/{total} {r['method']} noise {r['noise']} {setting_key(r['params'])} seed {r['seed']}: "
            f"val {100 * r['val_acc']:.1f}% test {100 * r['test_acc']:.1f}% ({r['train_cpu_s']:.1f} cpu-s, {time.time() - started:.0f}s)")


def _selected(cfg: CostConfig, runs: list[dict]) -> list[dict]:
    tune = list(range(cfg.tune_seeds or cfg.seeds))
    return [s for m in cfg.methods for p in cfg.noise
            if (s := select(runs, m, p, tuned_grid(cfg, runs, m, p), tune)) is not None]


def _result(cfg: CostConfig, runs: list[dict], timing: dict | None, complete: bool) -> dict[str, Any]:
    from . import cost_run

    chosen = _selected(cfg, runs)
    cost = {m: t["ratio_vs_sgd"] for m, t in (timing or {}).get("methods", {}).items()}
    return dict(schema=SCHEMA, name=cfg.name, complete=complete, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                config=dataclasses.asdict(cfg), task=dataclasses.asdict(cfg.task_for(0.0)),
                methods={m: METHODS[m] for m in cfg.methods},
                tuning_grid={m: settings(cfg, m) for m in cfg.methods},
                tuned_grid={m: {str(p): tuned_grid(cfg, runs, m, p) for p in cfg.noise} for m in cfg.methods},
                description=" ".join((__doc__.split("\n\n")[2], cost_run.__doc__.split("\n\n")[1])).replace("\n", " "),
                machine=dict(device="cpu", torch=torch.__version__, python=platform.python_version(), cpu_count=os.cpu_count(),
                             threads=1, workers=cfg.workers, nice=os.nice(0), load_average=list(os.getloadavg())),
                runs=runs, selected=chosen, paired_vs_sam_local=paired(chosen, "sam-local"), paired_vs_sgd=paired(chosen, "sgd"),
                timing=timing, budget_table=budget_table(chosen, cost, cfg.budgets) if cost else [])


def run_cost(cfg: CostConfig, out_dir: str, *, phase: str = "all", resume: bool = False, figures: bool = True,
             log=print) -> dict[str, Any]:
    """Run the accuracy phase (``accuracy``), the timing phase (``time``) or both (``all``)."""
    from . import cost_plots
    from .cost_time import time_methods

    if phase not in ("all", "accuracy", "time"):
        raise ValueError(f"phase must be 'all', 'accuracy' or 'time', got {phase!r}")
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, cfg.name)
    old = json.load(open(stem + ".json")) if (resume or phase == "time") and os.path.exists(stem + ".json") else {}
    if old and old.get("task") != dataclasses.asdict(cfg.task_for(0.0)):
        raise ValueError(f"{stem}.json was made with another task; run without --resume or into another --out")
    runs, timing = list(old.get("runs", [])), old.get("timing")
    save = lambda: json.dump(_result(cfg, runs, timing, False), open(stem + ".json", "w"), indent=1)  # noqa: E731
    if phase in ("all", "accuracy"):
        n_tune = cfg.tune_seeds or cfg.seeds
        for noise in sorted(cfg.noise, reverse=True):  # the noisy task first: a cut run still answers the headline
            while True:  # the grid, then its extensions past the edges the selections sit on
                done = {_key(r) for r in runs}
                tuning = [(m, noise, s, seed) for m in cfg.methods for s in tuned_grid(cfg, runs, m, noise)
                          for seed in range(n_tune) if (m, noise, setting_key(s), seed) not in done]
                if not tuning:
                    break
                _execute(cfg, tuning, runs, save, log)
            rest = [(sel["method"], noise, sel["params"], seed) for seed in range(n_tune, cfg.seeds)
                    for sel in _selected(cfg, runs) if sel["noise"] == noise]
            _execute(cfg, rest, runs, save, log)
    if phase in ("all", "time"):
        chosen = {s["method"]: s["params"] for s in _selected(cfg, runs) if s["noise"] == max(cfg.noise)}
        params = {m: chosen.get(m, settings(cfg, m)[0]) for m in cfg.methods}
        specs = {m: {k: v for k, v in METHODS[m].items() if k != "tune"} for m in cfg.methods}
        for m in [m for m in specs if specs[m].get("micro_impl") == "vmap"]:  # the default loop, timed beside
            specs[m + " (loop)"], params[m + " (loop)"] = dict(specs[m], micro_impl="loop"), params[m]
        timing = time_methods(cfg.task_for(max(cfg.noise)), specs, params, val_size=cfg.val_size, rounds=cfg.time_rounds,
                              steps=cfg.time_steps, warmup=cfg.time_warmup, log=log)
    result = _result(cfg, runs, timing, complete=True)
    json.dump(result, open(stem + ".json", "w"), indent=1)
    with open(stem + ".md", "w") as fh:
        fh.write(cost_plots.cost_markdown(result))
    result["files"] = [stem + ".json", stem + ".md"]
    if figures and timing:
        cost_plots.cost_figure(result, stem + ".png")
        result["files"].append(stem + ".png")
    return result


def cost_main(*, quick: bool, seeds: int | None, out: str, phase: str, resume: bool, workers: int | None,
              tune_seeds: int | None = None) -> int:
    """``python -m benchmarks.study --grid cost``: run it, print its tables; 2 on bad settings."""
    values: dict[str, Any] = dict(QUICK) if quick else {}
    if tune_seeds is not None:
        values["tune_seeds"] = tune_seeds
    if seeds is not None:
        values["seeds"] = seeds
    if workers is not None:
        values["workers"] = workers
    try:
        cfg = CostConfig(**values)
        if phase not in ("all", "accuracy", "time"):
            raise ValueError(f"--phase must be 'all', 'accuracy' or 'time', got {phase!r}")
    except ValueError as err:
        print(f"benchmarks.study: {err}", file=sys.stderr)
        return 2
    result = run_cost(cfg, out, phase=phase, resume=resume)
    from .cost_plots import cost_markdown

    print(cost_markdown(result))
    print("wrote " + ", ".join(result["files"]))
    return 0
