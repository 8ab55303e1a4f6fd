"""The named grids under the cost grid's tuning protocol: ``python -m benchmarks.study --grid NAME --tuned``.

    python -m benchmarks.study --grid noise --tuned [--workers 2] [--resume]
    python -m benchmarks.study --grid noise --tuned --quick             # the smoke run the tests take

Every grid of ``benchmarks/study/grids.yaml`` asks its question at one setting of the step's own
hyperparameters (``rho`` 0.05, ASAM's ``rho`` 0.5, ``lam`` 0.5). Here each cell of the grid (a variant
at one value of each axis it uses) is **tuned on the validation split** of the cost grid
(:func:`benchmarks.study.cost_run.load_split`: held out of the training set, noisy labels, removed
from the test set) over the hyperparameters of :data:`TUNES` that are not an axis of the grid:
the whole tuning grid runs on the first ``tune_seeds`` seeds; a selection on an edge of the grid
extends that edge (the value halved or doubled) up to ``extend`` times, so a reported best is
inside its grid or marked as still on an edge; the selected setting then runs on the remaining
seeds. Test accuracy is reported at the selected setting; paired differences (same seed: same
initialization, data order and shifts) compare each cell with its grid's baseline, each at its
own selected setting. The tuning values are the ``tuning:`` section of the grids' YAML, which a
grid's ``tuned:`` section overrides (it may shrink the grid's axes). Results:
``<out>/study_<grid>_tuned.{json,md}``.
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

from .cost_select import paired, select, setting_key
from .grid import GRIDS_FILE, GridConfig, cells, load_grid
from .task import AXIS_USERS, Task, train_run

__all__ = ["TUNES", "Tuning", "load_tuning", "settings", "tune_cell", "run_tuned", "tuned_main"]

SCHEMA = "dist-sam-study-tuned/1"
#: variant -> the hyperparameters it is tuned over (those that are an axis of the grid stay axes)
TUNES: dict[str, tuple[str, ...]] = {"sgd": (), "sam-local": ("rho",), "m-sam": ("rho",), "rwsam-local": ("rho", "lam"),
                                     "asam-local": ("asam_rho",), "rwasam-local": ("asam_rho", "lam")}


@dataclasses.dataclass(kw_only=True)
class Tuning:
    """The tuning protocol's values (``tuning:`` of the grids' YAML, a grid's ``tuned:`` over it)."""

    val_size: int = 300
    tune_seeds: int = 2
    extend: int = 2
    values: dict[str, tuple[float, ...]] = dataclasses.field(
        default_factory=lambda: dict(rho=(0.05, 0.1, 0.2), asam_rho=(0.25, 0.5, 1.0), lam=(0.5, 2.0)))

    def __post_init__(self) -> None:
        self.values = {k: tuple(v) for k, v in self.values.items()}
        unknown = sorted(set(self.values) - {k for keys in TUNES.values() for k in keys})
        if unknown:
            raise ValueError(f"tuning: unknown hyperparameters {unknown}; accepted: ['asam_rho', 'lam', 'rho']")
        for key, vals in self.values.items():
            if not vals or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in vals):
                raise ValueError(f"tuning.{key}: a non-empty list of positive numbers, got {list(vals)}")
        if self.val_size < 10 or self.val_size % 10:
            raise ValueError(f"tuning.val_size must be a positive multiple of 10 (10 classes), got {self.val_size}")
        if isinstance(self.tune_seeds, bool) or not isinstance(self.tune_seeds, int) or self.tune_seeds < 1:
            raise ValueError(f"tuning.tune_seeds must be an integer >= 1, got {self.tune_seeds!r}")
        if isinstance(self.extend, bool) or not isinstance(self.extend, int) or self.extend < 0:
            raise ValueError(f"tuning.extend must be an integer >= 0, got {self.extend!r}")


_TUNING_KEYS = ("val_size", "tune_seeds", "extend")


def load_tuning(name: str, path: str | None = None, *, quick: bool = False,
                seeds: int | None = None) -> tuple[GridConfig, Tuning]:
    """The grid ``name`` (its ``tuned:`` axes applied) and its tuning protocol."""
    import yaml

    path = path or GRIDS_FILE
    with open(path) as fh:
        doc = yaml.safe_load(fh) or {}
    own = dict(((doc.get("grids") or {}).get(name) or {}).get("tuned") or {})
    grid = load_grid(name, path, quick=quick, seeds=seeds)
    quick_tuning = dict(val_size=50, tune_seeds=1, extend=1) if quick else {}  # a grid's own tuned: still wins
    merged = {**(doc.get("tuning") or {}), **quick_tuning, **{k: v for k, v in own.items() if k != "axes"}}
    unknown = sorted(set(merged) - set(_TUNING_KEYS) - {k for keys in TUNES.values() for k in keys})
    if unknown:
        raise ValueError(f"{path}: tuning of grid {name!r}: unknown keys {unknown}; accepted: "
                         f"{list(_TUNING_KEYS) + ['asam_rho', 'lam', 'rho', 'axes']}")
    values = {**Tuning().values, **{k: v for k, v in merged.items() if k not in _TUNING_KEYS}}
    tuning = Tuning(values=values, **{k: merged[k] for k in _TUNING_KEYS if k in merged})
    axes = own.get("axes") or {}
    if axes and not quick:
        grid = dataclasses.replace(grid, axes={**grid.axes, **axes})
    if tuning.tune_seeds > grid.seeds:
        raise ValueError(f"grid {name!r}: tuning.tune_seeds {tuning.tune_seeds} > seeds {grid.seeds}")
    return grid, tuning


def tuned_keys(grid: GridConfig, variant: str) -> tuple[str, ...]:
    """The hyperparameters ``variant`` is tuned over in ``grid``: its :data:`TUNES` that are no axis."""
    return tuple(k for k in TUNES[variant] if k not in grid.axes)


def settings(values: dict[str, tuple[float, ...]], keys: tuple[str, ...]) -> list[dict]:
    return [dict(zip(keys, combo)) for combo in itertools.product(*(values[k] for k in keys))]


def _label(variant: str, params: dict) -> str:
    rest = ",".join(f"{k}={v}" for k, v in params.items() if k != "noise")
    return variant + (f" [{rest}]" if rest else "")


def tune_cell(grid_task: dict, variant: str, params: dict, keys: tuple[str, ...], tuning: Tuning, seeds: int,
              done: list[dict]) -> list[dict]:
    """Every run of one cell: the tuning grid on the tuning seeds, edges extended, the selection on
    the rest. ``done`` holds this cell's runs from an earlier, cut run (not repeated)."""
    runs, values = list(done), {k: tuning.values[k] for k in keys}
    label, noise, tune_seeds = _label(variant, params), params.get("noise", grid_task.get("noise", 0.0)), list(range(tuning.tune_seeds))

    def run(setting: dict, seed: int) -> None:
        if any(r["seed"] == seed and setting_key(r["params"]) == setting_key(setting) for r in runs):
            return
        task = Task(**{**grid_task, **params, **setting, "probe_every": 0})
        r = train_run(task, variant, seed, val_size=tuning.val_size)
        runs.append(dict(r, params=setting, cell=params, method=label, noise=noise))

    extended = dict.fromkeys(keys, 0)
    while True:
        for setting, seed in itertools.product(settings(values, keys), tune_seeds):
            run(setting, seed)
        best = select(runs, label, noise, settings(values, keys), tune_seeds)
        grow = [k for k in best["at_grid_edge"] if extended[k] < tuning.extend]
        if not grow:
            break
        for k in grow:
            v, vs = best["params"][k], values[k]
            values[k] = tuple(sorted({*vs, v * 2 if v == max(vs) else v / 2}))
            extended[k] += 1
    for seed in range(tuning.tune_seeds, seeds):
        run(best["params"], seed)
    return runs


def _one(args: tuple) -> list[dict]:
    return tune_cell(*args)


def _selected(grid: GridConfig, runs: list[dict], tuning: Tuning) -> list[dict]:
    out = []
    for variant, params in cells(grid):
        label = _label(variant, params)
        rs = [r for r in runs if r["method"] == label and r["cell"] == params]
        if not rs:
            continue
        grid_settings = list({setting_key(r["params"]): r["params"] for r in rs}.values())
        keys = tuned_keys(grid, variant)
        grid_settings.sort(key=lambda p: tuple(p[k] for k in keys))
        s = select(rs, label, rs[0]["noise"], grid_settings, list(range(tuning.tune_seeds)))
        if s is not None:
            out.append(dict(s, variant=variant, cell=params))
    return out


def _pairs(grid: GridConfig, chosen: list[dict]) -> list[dict]:
    """Each pair's first variant minus its baseline, and every variant minus SAM-local where the
    grid has it, at the same values of the axes the baseline uses; each at its own selected setting."""
    wanted = list(grid.pairs) + [(v, "sam-local") for v in grid.variants if "sam-local" in grid.variants
                                 and v != "sam-local" and (v, "sam-local") not in grid.pairs]
    out = []
    for rw, base in wanted:
        for s in (s for s in chosen if s["variant"] == rw):
            match = {k: v for k, v in s["cell"].items() if base in AXIS_USERS[k]}
            b = next((c for c in chosen if c["variant"] == base and c["cell"] == match), None)
            if b is not None:
                out += [dict(p, cell=s["cell"], variant=rw, baseline_variant=base) for p in paired([b, s], b["method"])]
    return out


def _result(grid: GridConfig, tuning: Tuning, runs: list[dict], complete: bool) -> dict[str, Any]:
    chosen = _selected(grid, runs, tuning)
    return dict(schema=SCHEMA, name=grid.stem + "_tuned", grid=grid.name, complete=complete,
                created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), config=dataclasses.asdict(grid),
                tuning=dataclasses.asdict(tuning), task=dataclasses.asdict(Task(**grid.task)),
                tuned={v: tuned_keys(grid, v) for v in grid.variants}, description=__doc__.split("\n\n")[2].replace("\n", " "),
                machine=dict(device="cpu", torch=torch.__version__, python=platform.python_version(), cpu_count=os.cpu_count(),
                             threads=1, nice=os.nice(0), load_average=list(os.getloadavg())),
                runs=runs, selected=chosen, paired=_pairs(grid, chosen))


def run_tuned(grid: GridConfig, tuning: Tuning, out_dir: str, *, workers: int = 1, resume: bool = False,
              log=print) -> dict[str, Any]:
    """Tune every cell (``workers`` processes, one cell each at a time); the JSON is rewritten after each cell."""
    from .plots import tuned_markdown

    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, grid.stem + "_tuned")
    old = json.load(open(stem + ".json")) if resume and os.path.exists(stem + ".json") else {}
    same = lambda value: json.loads(json.dumps(value))  # noqa: E731 (tuples are lists in the JSON)
    if old and (old.get("task") != same(dataclasses.asdict(Task(**grid.task)))
                or old.get("tuning") != same(dataclasses.asdict(tuning))):
        raise ValueError(f"{stem}.json was made with another task or tuning; run without --resume or into another --out")
    runs = list(old.get("runs", []))
    jobs = [(grid.task, v, p, tuned_keys(grid, v), tuning, grid.seeds,
             [r for r in runs if r["method"] == _label(v, p) and r["cell"] == p]) for v, p in cells(grid)]
    # the noisiest cells first (a cut run still answers the headline); the slowest variants first within them
    jobs.sort(key=lambda j: (-j[2].get("noise", 0.0), j[1] == "sgd"))
    started = time.time()

    def collect(i: int, cell_runs: list[dict]) -> None:
        label = cell_runs[0]["method"]
        runs[:] = [r for r in runs if r["method"] != label or r["cell"] != cell_runs[0]["cell"]] + cell_runs
        with open(stem + ".json", "w") as fh:
            json.dump(_result(grid, tuning, runs, False), fh, indent=1)
        log(f"[study {grid.name} tuned] cell {i + 1}/{len(jobs)} {label} noise {cell_runs[0]['noise']}: {len(cell_runs)} runs "
            f"({time.time() - started:.0f}s)")

    if workers > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            for i, f in enumerate(as_completed([pool.submit(_one, j) for j in jobs])):
                collect(i, f.result())
    else:
        for i, j in enumerate(jobs):
            collect(i, _one(j))
    result = _result(grid, tuning, runs, complete=True)
    with open(stem + ".json", "w") as fh:
        json.dump(result, fh, indent=1)
    with open(stem + ".md", "w") as fh:
        fh.write(tuned_markdown(result))
    result["files"] = [stem + ".json", stem + ".md"]
    return result


def tuned_main(name: str, path: str | None, *, quick: bool, seeds: int | None, out: str, workers: int | None,
               resume: bool) -> int:
    """``python -m benchmarks.study --grid NAME --tuned``: 2 on a bad grid or tuning section."""
    from .plots import tuned_markdown

    try:
        grid, tuning = load_tuning(name, path, quick=quick, seeds=seeds)
    except ValueError as err:
        print(f"benchmarks.study: {err}", file=sys.stderr)
        return 2
    result = run_tuned(grid, tuning, out, workers=workers or 1, resume=resume)
    print(tuned_markdown(result))
    print("wrote " + ", ".join(result["files"]))
    return 0
