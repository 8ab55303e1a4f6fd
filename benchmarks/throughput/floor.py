"""m-SAM against its sequential floor, eager, compiled and batched (issue 14).

    python -m benchmarks.throughput.floor --config benchmarks/throughput/configs/msam_floor_cpu.yaml
    python -m benchmarks.throughput.floor --config benchmarks/throughput/configs/msam_floor_quick.yaml --out /tmp/floor

For each ``m = b/k`` the *floor* is what the sequential arithmetic of an m-SAM step costs, timed
in the same process and the same interleaved rounds as the step itself: ``2·(b/m)``
forward-backward passes at batch ``m`` (each micro-batch's ascent and descent) plus one
base-optimizer step, and nothing else (no copies, norms, scales, restores). Modes:

* ``eager``: ``sam_step(..., ascent="micro")`` and the floor on the eager module;
* ``compiled``: both through ``torch.compile(module, mode=compile_mode, backend=compile_backend)``
  (static shapes; the warm-up steps compile, their wall time is recorded);
* ``vmap``: ``sam_step(..., micro_impl="vmap")`` (``dist_sam.optim.batched``) against the eager
  floor: batching may beat the sequential floor, which is the point of it.

Also timed: the SGD step (one forward-backward at batch ``b``, one step), eager and compiled, for
the ratios against SGD. One process, no DDP, synthetic in-memory batches, ``lr = 0`` by default
(every step at the same weights). A forward-pre-hook counts the forward passes of one floor step
and one m-SAM step of each mode on the eager module (``forwards``), so the floor's ``2·(b/m)`` is
counted, not assumed. Outputs: ``<out>/<name>.json``, ``<name>.md``, ``<name>.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import os
import sys
import time
from typing import Any, Callable

import torch
from torch import nn

import dist_sam

from ..common import output
from ..common.timing import paired_ratio, rotated, stats
from .config import RESULTS_DIR, BenchConfig
from .harness import _build_model, compile_model

__all__ = ["SCHEMA", "MODES", "FloorConfig", "load_floor_config", "measure_floor", "main"]

SCHEMA = "dist-sam-msam-floor/1"
MODES = ("eager", "compiled", "vmap")
TARGET = 1.15  # issue 14: m-SAM step <= 1.15x its floor at every m (CPU preset, eager)


@dataclasses.dataclass(kw_only=True)
class FloorConfig:
    """One floor run (YAML keys are these names). ``divisors``: the ``k`` of ``m = b/k``; other
    fields as :class:`benchmarks.throughput.config.BenchConfig`."""

    name: str = "msam_floor"
    model: str = "resnet18"
    image_size: int = 32
    num_classes: int = 10
    batch_size: int = 32
    divisors: tuple[int, ...] = (2, 4, 8)
    modes: tuple[str, ...] = MODES
    threads: int = 1
    warmup: int = 2
    steps: int = 20
    steps_per_round: int = 2
    rho: float = 0.05
    lr: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    device: str = "cpu"
    autocast_dtype: str | None = None
    channels_last: bool = False
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    quick: bool = False

    def __post_init__(self) -> None:
        self.divisors, self.modes = tuple(self.divisors), tuple(self.modes)
        bad = [k for k in self.divisors if isinstance(k, bool) or not isinstance(k, int) or k < 1 or self.batch_size % k]
        if not self.divisors or bad:
            raise ValueError(f"divisors must be integers k >= 1 dividing batch_size {self.batch_size}, got {list(self.divisors)}")
        if not self.modes or set(self.modes) - set(MODES):
            raise ValueError(f"modes must be a non-empty subset of {MODES}, got {list(self.modes)}")
        if self.steps < 20 and not self.quick:
            raise ValueError(f"steps must be >= 20 (median of at least 20 steps), got {self.steps}; set quick: true")
        self.bench()  # the shared fields are validated by BenchConfig

    def bench(self, **extra: Any) -> BenchConfig:
        """The :class:`BenchConfig` with the shared fields (model building, compilation)."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(BenchConfig) if hasattr(self, f.name)}
        shared.update(world_sizes=(1,), variants=("sgd",), quick=True)
        shared.update(extra)
        return BenchConfig(**shared)


def load_floor_config(path: str | None, **overrides: Any) -> FloorConfig:
    """``FloorConfig`` from YAML (or the defaults), non-``None`` overrides applied."""
    import yaml

    values: dict[str, Any] = {}
    if path:
        with open(path) as fh:
            values = yaml.safe_load(fh) or {}
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(FloorConfig)})
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; accepted: {[f.name for f in dataclasses.fields(FloorConfig)]}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return FloorConfig(**values)


def _tasks(cfg: FloorConfig, module: nn.Module, compiled: nn.Module | None, dtype) -> dict[tuple, Callable]:
    """``(mode, kind, m) -> step(x, y)`` for kind in ``floor | msam | sgd``."""
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    base = dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    autocast = (lambda x: torch.autocast(x.device.type, dtype=dtype)) if dtype else (lambda x: torch.autocast("cpu", enabled=False))

    def floor(model, opt, m, passes=2):
        def run(x, y):
            opt.zero_grad(set_to_none=True)
            c = x.shape[0] // m
            for xj, yj in zip(x.split(m), y.split(m)):
                for _ in range(passes):  # the floor: the micro-batch's ascent and descent passes
                    with autocast(x):
                        loss = loss_fn(model(xj), yj).mean() / c
                    loss.backward()
            opt.step()
            return loss.detach()
        return run

    def msam(model, opt, m, impl):
        return lambda x, y: dist_sam.sam_step(model, opt, loss_fn, x, y, ascent="micro", micro_batch_size=m,
                                              micro_impl=impl, autocast_dtype=dtype)

    tasks: dict[tuple, Callable] = {}
    runs = {"eager": (module, "loop"), "compiled": (compiled, "loop"), "vmap": (module, "vmap")}
    for mode in cfg.modes:
        model, impl = runs[mode]
        if mode != "vmap":
            tasks[(mode, "sgd", cfg.batch_size)] = floor(model, torch.optim.SGD(module.parameters(), **base), cfg.batch_size,
                                                         passes=1)
        for k in cfg.divisors:
            m = cfg.batch_size // k
            if mode != "vmap":
                tasks[(mode, "floor", m)] = floor(model, torch.optim.SGD(module.parameters(), **base), m)
            opt = dist_sam.create_optimizer("sam", module.parameters(), base="sgd", rho=cfg.rho, **base)
            tasks[(mode, "msam", m)] = msam(model, opt, m, impl)
    return tasks


def _count_forwards(module: nn.Module, fn: Callable, batch) -> int:
    count = [0]
    handle = module.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    try:
        fn(*batch)
    finally:
        handle.remove()
    return count[0]


def measure_floor(cfg: FloorConfig) -> dict[str, Any]:
    """Warm up and time every task, interleaved; per-task times plus forward counts."""
    bench = cfg.bench()
    device = bench.torch_device
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    module = _build_model(bench).to(device)
    compiled = compile_model(module, dataclasses.replace(bench, compile=True)) if "compiled" in cfg.modes else None
    dtype = getattr(torch, cfg.autocast_dtype) if cfg.autocast_dtype else None
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(1000)
    batch = (torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=gen).to(device, memory_format=fmt),
             torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=gen).to(device))
    tasks = _tasks(cfg, module, compiled, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[tuple, list[float]] = {key: [] for key in tasks}
    warmup_s: dict[tuple, float] = {}
    forwards = {key: _count_forwards(module, fn, batch) for key, fn in tasks.items() if key[0] != "compiled"}
    for key, fn in tasks.items():
        sync()
        start = time.perf_counter()
        for _ in range(cfg.warmup):
            fn(*batch)
        sync()
        warmup_s[key] = time.perf_counter() - start
    keys = list(tasks)
    for r in range(math.ceil(cfg.steps / cfg.steps_per_round)):
        for key in rotated(keys, r):
            for _ in range(cfg.steps_per_round):
                sync()
                start = time.perf_counter()
                tasks[key](*batch)
                sync()
                times[key].append(time.perf_counter() - start)
    return dict(times=times, warmup_s=warmup_s, forwards=forwards,
                finite=all(bool(torch.isfinite(p).all()) for p in module.parameters()))


def summarize_floor(cfg: FloorConfig, raw: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per (mode, m): floor, step, their ratio (median and round-paired), vs SGD."""
    t, records = raw["times"], []
    for mode in cfg.modes:
        ref = "eager" if mode == "vmap" else mode  # the vmap step against the sequential (eager) floor
        for k in cfg.divisors:
            m = cfg.batch_size // k
            floor, step, sgd = t.get((ref, "floor", m)), t[(mode, "msam", m)], t.get((ref, "sgd", cfg.batch_size))
            rec = dict(mode=mode, m=m, k=k, micro_batches=k, floor_of=ref, step_s=stats(step),
                       warmup_s=raw["warmup_s"][(mode, "msam", m)], forwards_per_step=raw["forwards"].get((mode, "msam", m)))
            if floor:
                rec.update(floor_s=stats(floor), forwards_per_floor=raw["forwards"].get((ref, "floor", m)),
                           ratio_to_floor=statistics.median(step) / statistics.median(floor),
                           ratio_to_floor_paired=paired_ratio(step, floor, cfg.steps_per_round))
                rec["within_target"] = rec["ratio_to_floor"] <= TARGET
                rec["floor_ratio_vs_sgd"] = statistics.median(floor) / statistics.median(sgd) if sgd else None
            if sgd:
                rec.update(sgd_s=stats(sgd), forwards_per_sgd=raw["forwards"].get((ref, "sgd", cfg.batch_size)),
                           step_ratio_vs_sgd=statistics.median(step) / statistics.median(sgd))
            records.append(rec)
    return records


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# m-SAM floor: {result['name']} ({result['config']['model']}, b={result['config']['batch_size']})", "",
             f"target: step / floor <= {TARGET}", "",
             "| mode | m | floor (ms) | step (ms) | step / floor | paired | step / SGD | floor / SGD |", "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, s="{:.2f}": "n/a" if v is None else s.format(v)  # noqa: E731
    for r in result["records"]:
        floor_ms = 1e3 * r["floor_s"]["median"] if "floor_s" in r else None
        lines.append(f"| {r['mode']} | {r['m']} | {fmt(floor_ms, '{:.1f}')} "
                     f"| {1e3 * r['step_s']['median']:.1f} | {fmt(r.get('ratio_to_floor'))} | {fmt(r.get('ratio_to_floor_paired'))} "
                     f"| {fmt(r.get('step_ratio_vs_sgd'))} | {fmt(r.get('floor_ratio_vs_sgd'))} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str) -> None:
    """Step / floor against m, one line per mode, the target dashed."""
    fig, ax = output.pyplot().subplots(figsize=(5.5, 3.8))
    for mode in result["config"]["modes"]:
        rows = [r for r in result["records"] if r["mode"] == mode and r.get("ratio_to_floor") is not None]
        ax.plot([r["m"] for r in rows], [r["ratio_to_floor"] for r in rows], marker="o", label=mode)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(TARGET, color="red", ls="--", lw=0.8, label=f"target {TARGET}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("m (micro-batch size)")
    ax.set_ylabel("m-SAM step / its floor")
    ax.set_title(f"{result['config']['model']}, b = {result['config']['batch_size']}")
    ax.legend()
    output.save_figure(fig, path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m benchmarks.throughput.floor --config ... [--out DIR] [--steps N] [--no-plot]``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput.floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None)
    p.add_argument("--out", default=RESULTS_DIR)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    try:
        cfg = load_floor_config(args.config, steps=args.steps)
    except (ValueError, OSError) as err:
        print(f"benchmarks.throughput.floor: {err}", file=sys.stderr)
        return 2
    from .report import machine

    started = time.time()
    raw = measure_floor(cfg)
    result = dict(schema=SCHEMA, name=cfg.name, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), config=dataclasses.asdict(cfg),
                  machine=machine(cfg.bench()), target=TARGET, finite=raw["finite"], records=summarize_floor(cfg, raw))
    result["wall_time_s"] = time.time() - started
    stem = os.path.join(args.out, cfg.name)
    output.write_json(result, stem + ".json")
    with open(stem + ".md", "w") as fh:
        fh.write(markdown(result))
    if not args.no_plot:
        plot(result, stem + ".png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
