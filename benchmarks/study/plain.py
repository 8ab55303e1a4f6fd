"""The m-sharpness accuracy study: the paper's Tables 1, 4, 6 and 7 in miniature, on CPU.

    python -m benchmarks.study            # 5 seeds x 7 variants x {0%, 40%} label noise, <= 30 min on 2 cores
    python -m benchmarks.study --quick    # the same grid, 2 seeds and a 1-epoch schedule (<= 3 min)
    python -m benchmarks.study --grid noise [--quick]   # a named grid: noise, lam, estimator, m, asam, cost
                                          # (benchmarks/study/grid.py, benchmarks/study/grids.yaml)

Data: the demo dataset of ``dist-sam make-demo-data`` (scikit-learn's 1,797 handwritten digits),
loaded in memory at its 8x8 source resolution instead of decoded from JPEGs: the same fixed split
(every fifth image is test, 1,437 train) and the same seeded label flips of the training set
(``dist_sam.data.demo.flip_labels``, noise seed 0), so ``make-demo-data --label-noise 0.4 --seed 0``
holds the same labels. Test labels stay clean. The model is ``dist_sam.train.models.SmallCNN``.

How each variant maps to the library's modes (SPEC.md §2), with ``n = 4`` virtual workers of
``b = 16`` (global batch 64) simulated in one process:

* ``sgd``: plain SGD on the global batch.
* ``n-sam``: ``sam_step(ascent="full", ascent_data=<the whole training set>)``, ``m = N``.
* ``sam-global``: ``ascent="local"`` on the whole global batch in one process: the perturbation
  comes from the gradient of all 64 samples, which is what ``ascent="global"`` computes (after its
  all-reduce) on 4 workers; ``m = 64``.
* ``rwsam-global``: RW-SAM (``fd``, ``mu="auto"``) the same way, weights over all 64 samples:
  the paper's single-GPU mini-batch RW-SAM (its Tables 1 and 4 compare it with ``sam-global``).
* ``sam-local``: ``ascent="micro", micro_batch_size=16``: SPEC.md §2 shows that device-local
  ascent on 4 workers of 16 is exactly m-SAM with ``m = 16`` over the global batch.
* ``rwsam-local``: RW-SAM the way the library runs it data-parallel on 4 workers: local ascent,
  weights over each worker's 16 samples (``ascent="micro", micro_batch_size=16``).
* ``m-sam``: ``ascent="micro", micro_batch_size=4`` (``m = 4``).

At the end: test accuracy (clean labels), train accuracy, and the SGN-covariance trace
(``dist_sam.diagnostics.sgn_covariance_trace``, model in eval mode) over the training set with
the labels it was trained on. Results: ``<out>/<name>.json``, ``<name>.md``, ``<name>.png``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["SCHEMA", "RESULTS_DIR", "QUICK", "StudyConfig", "VARIANTS", "load_digits_split", "train_one", "run_study"]

SCHEMA = "dist-sam-study/1"
RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")
NUM_WORKERS_SIMULATED = 4  # virtual data-parallel workers; per-worker batch = batch_size / 4

#: name -> (optimizer, ascent, micro-batch size: "b" per-worker batch, "m" small_m, None), mapping
VARIANTS: dict[str, tuple[str | None, str | None, str | None, str]] = {
    "sgd": (None, None, None, "plain SGD on the global batch"),
    "n-sam": ("sam", "full", None, "ascent='full' over the whole training set (m = N)"),
    "sam-global": ("sam", "local", None, "ascent='local' on the global batch in one process = ascent='global' on 4 workers"),
    "rwsam-global": ("rwsam", "local", None, "RW-SAM fd on the global batch in one process (the paper's mini-batch RW-SAM)"),
    "sam-local": ("sam", "micro", "b", "ascent='micro', m = b = SAM-local on 4 workers of b"),
    "rwsam-local": ("rwsam", "micro", "b", "RW-SAM fd, ascent='micro', m = b = RW-SAM-local on 4 workers of b"),
    "m-sam": ("sam", "micro", "m", "ascent='micro', m = small_m (m-SAM)"),
}


@dataclasses.dataclass(kw_only=True)
class StudyConfig:
    """The study's settings (defaults: the full run)."""

    name: str = "study"
    noise: tuple[float, ...] = (0.0, 0.4)
    seeds: int = 5
    variants: tuple[str, ...] = tuple(VARIANTS)
    epochs: int = 20
    nsam_epochs: int | None = None  # None: epochs. n-SAM costs a pass over the training set per step
    batch_size: int = 64  # global; 4 virtual workers of batch_size / 4
    small_m: int = 4
    image_size: int = 8
    width: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    rho: float = 0.05
    lam: float = 0.5
    mu: float | str = "auto"  # the paper's calibration against exact per-sample norms
    workers: int = 2
    trace_samples: int | None = None  # None: the whole training set
    max_steps_per_epoch: int | None = None  # None: every full batch (quick mode cuts epochs short)
    noise_seed: int = 0
    quick: bool = False

    def __post_init__(self) -> None:
        self.noise, self.variants = tuple(self.noise), tuple(self.variants)
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"StudyConfig.variants: unknown {unknown}; accepted: {list(VARIANTS)}")
        b = self.batch_size // NUM_WORKERS_SIMULATED
        if self.batch_size % NUM_WORKERS_SIMULATED or b % self.small_m:
            raise ValueError(f"StudyConfig.batch_size must split into {NUM_WORKERS_SIMULATED} workers whose batch "
                             f"small_m divides; got batch_size={self.batch_size}, small_m={self.small_m}")
        if self.nsam_epochs is None:
            self.nsam_epochs = self.epochs
        if self.seeds < 2:
            raise ValueError(f"StudyConfig.seeds must be >= 2 (a std needs two), got {self.seeds}")


@functools.lru_cache(maxsize=4)  # one load per worker process and noise level
def load_digits_split(noise: float, noise_seed: int = 0, image_size: int = 8) -> dict[str, torch.Tensor]:
    """The demo dataset's split and label flips, as normalized 3-channel tensors in memory."""
    from sklearn.datasets import load_digits

    from dist_sam.data.demo import VAL_EVERY, flip_labels

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = np.asarray(digits.target, dtype=np.int64)
    is_val = np.arange(len(labels)) % VAL_EVERY == 0
    train_ids, val_ids = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    noisy = flip_labels(labels[train_ids], noise, noise_seed)
    x = images.unsqueeze(1)
    if image_size != 8:
        x = nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    mean, std = x[train_ids].mean(), x[train_ids].std()
    x = ((x - mean) / std).expand(-1, 3, -1, -1).contiguous()  # the demo JPEGs are RGB
    return dict(x_train=x[train_ids], y_train=torch.from_numpy(noisy), y_train_clean=torch.from_numpy(labels[train_ids]),
                x_test=x[val_ids], y_test=torch.from_numpy(labels[val_ids]))


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train_one(cfg: StudyConfig, variant: str, noise: float, seed: int) -> dict[str, Any]:
    """Train one model; return its test/train accuracy, SGN-covariance trace and cost."""
    import dist_sam
    from dist_sam.diagnostics import sgn_covariance_trace
    from dist_sam.train.models import SmallCNN

    torch.set_num_threads(1)
    data = load_digits_split(noise, cfg.noise_seed, cfg.image_size)
    opt_name, ascent, micro, _ = VARIANTS[variant]
    torch.manual_seed(seed)
    model = SmallCNN(10, width=cfg.width)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    base = dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if opt_name is None:
        opt = torch.optim.SGD(model.parameters(), **base)
    else:
        extra = dict(estimator="fd", lam=cfg.lam, mu=cfg.mu) if opt_name == "rwsam" else {}
        opt = dist_sam.create_optimizer(opt_name, model.parameters(), base="sgd", rho=cfg.rho, **base, **extra)
    m = {"b": cfg.batch_size // NUM_WORKERS_SIMULATED, "m": cfg.small_m, None: None}[micro]
    epochs = cfg.nsam_epochs if variant == "n-sam" else cfg.epochs
    n, b = len(data["y_train"]), cfg.batch_size
    steps_per_epoch = min(n // b, cfg.max_steps_per_epoch or n)  # drop the last partial batch: it must split into micro-batches
    total = epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    full_data = list(zip(data["x_train"].split(512), data["y_train"].split(512))) if ascent == "full" else None
    gen = torch.Generator().manual_seed(seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * b:(i + 1) * b]
            x, y = data["x_train"][idx], data["y_train"][idx]
            if opt_name is None:
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x), y).mean().backward()
                opt.step()
            else:
                dist_sam.sam_step(model, opt, loss_fn, x, y, ascent=ascent, micro_batch_size=m, ascent_data=full_data)
            schedule.step()
    train_time, train_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    model.eval()
    k = cfg.trace_samples or n
    trace = sgn_covariance_trace(model, loss_fn, list(zip(data["x_train"][:k].split(256), data["y_train"][:k].split(256))))
    return dict(variant=variant, noise=noise, seed=seed, epochs=epochs, steps=total, train_time_s=train_time, train_cpu_s=train_cpu,
                test_acc=_accuracy(model, data["x_test"], data["y_test"]),
                train_acc=_accuracy(model, data["x_train"], data["y_train"]),
                train_acc_clean=_accuracy(model, data["x_train"], data["y_train_clean"]),
                sgn_trace=float(trace), finite=all(bool(torch.isfinite(p).all()) for p in model.parameters()))


def _task(args: tuple) -> dict[str, Any]:
    cfg_dict, variant, noise, seed = args
    return train_one(StudyConfig(**cfg_dict), variant, noise, seed)


def _progress(r: dict, done: int, total: int, started: float) -> None:
    print(f"[study] {done}/{total} {r['variant']:<10} noise {r['noise']:.1f} seed {r['seed']}: test acc {100 * r['test_acc']:.1f}%, "
          f"tr Σ {r['sgn_trace']:.3g}, {r['train_cpu_s']:.0f} cpu-s ({time.time() - started:.0f}s elapsed)", flush=True)


def _cost(cfg: StudyConfig, variant: str) -> float:
    """A rough relative cost, to start the long runs first (better packing on the workers)."""
    rel = {"sgd": 1, "sam-global": 2, "rwsam-global": 3, "sam-local": 4, "rwsam-local": 6, "m-sam": 12, "n-sam": 2 + 1437 / 64}[variant]
    return rel * (cfg.nsam_epochs if variant == "n-sam" else cfg.epochs)


def _summarize(cfg: StudyConfig, runs: list[dict]) -> list[dict]:
    out = []
    for v in cfg.variants:
        for p in cfg.noise:
            rs = [r for r in runs if r["variant"] == v and r["noise"] == p]
            acc, tr = [r["test_acc"] for r in rs], [r["sgn_trace"] for r in rs]
            out.append(dict(variant=v, noise=p, n=len(rs), test_acc_mean=statistics.mean(acc), test_acc_std=statistics.stdev(acc),
                            train_acc_mean=statistics.mean(r["train_acc"] for r in rs),
                            sgn_trace_mean=statistics.mean(tr), sgn_trace_std=statistics.stdev(tr),
                            cpu_s_per_epoch=statistics.mean(r["train_cpu_s"] / r["epochs"] for r in rs)))
    return out


def run_study(cfg: StudyConfig, out_dir: str) -> dict[str, Any]:
    """Run the whole grid on ``cfg.workers`` processes; write JSON, markdown and the figure."""
    import platform

    from . import plain_plots as plots

    started = time.time()
    load = list(os.getloadavg())
    tasks = [(v, p, s) for v in cfg.variants for p in cfg.noise for s in range(cfg.seeds)]
    tasks.sort(key=lambda t: -_cost(cfg, t[0]))
    cfg_dict = dataclasses.asdict(cfg)
    if cfg.workers == 1:
        runs = []
        for t in tasks:
            runs.append(_task((cfg_dict, *t)))
            _progress(runs[-1], len(runs), len(tasks), started)
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_task, (cfg_dict, *t)) for t in tasks]
            runs = []
            for future in as_completed(futures):
                runs.append(future.result())
                _progress(runs[-1], len(runs), len(tasks), started)
    b = cfg.batch_size // NUM_WORKERS_SIMULATED
    ms = {"sgd": None, "n-sam": 1437, "sam-global": cfg.batch_size, "rwsam-global": cfg.batch_size, "sam-local": b,
          "rwsam-local": b, "m-sam": cfg.small_m}
    notes = [f"rho = {cfg.rho} for every SAM variant; RW-SAM lam = {cfg.lam}, mu = {cfg.mu}; SGD base lr {cfg.lr} (cosine), "
             f"momentum {cfg.momentum}, weight decay {cfg.weight_decay}; "
             f"global batch {cfg.batch_size} = {NUM_WORKERS_SIMULATED} virtual workers x {b}."]
    if "n-sam" in cfg.variants and cfg.nsam_epochs < cfg.epochs:
        notes.append(f"n-SAM ran a shorter schedule ({cfg.nsam_epochs} epochs instead of {cfg.epochs}) to fit the time budget.")
    if cfg.quick:
        notes.append("Quick mode: a smoke run of the harness, not a result.")
    result = dict(
        schema=SCHEMA, name=cfg.name, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), wall_time_s=time.time() - started,
        config=cfg_dict, description=__doc__.split("\n\n")[2].replace("\n", " "),
        machine=dict(device="cpu", torch=torch.__version__, python=platform.python_version(), cpu_count=os.cpu_count(),
                     threads_per_process=1, load_average=load, load_average_end=list(os.getloadavg())),
        variants=[dict(name=v, optimizer=VARIANTS[v][0] or "sgd", ascent=VARIANTS[v][1], m=ms[v], mapping=VARIANTS[v][3],
                       epochs=cfg.nsam_epochs if v == "n-sam" else cfg.epochs) for v in cfg.variants],
        runs=sorted(runs, key=lambda r: (cfg.variants.index(r["variant"]), r["noise"], r["seed"])),
        summary=_summarize(cfg, runs), notes=notes,
    )
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, cfg.name)
    with open(stem + ".json", "w") as fh:
        json.dump(result, fh, indent=1)
    with open(stem + ".md", "w") as fh:
        fh.write(plots.study_markdown(result))
    plots.study_figure(result, stem + ".png")
    result["files"] = [stem + ".json", stem + ".md", stem + ".png"]
    return result


QUICK = dict(name="study_quick", seeds=2, epochs=1, nsam_epochs=1, trace_samples=256, max_steps_per_epoch=8, quick=True)
