"""The grid study's task and its one training run (``python -m benchmarks.study --grid NAME``).

**Task: few-shot digits.** ``train_size`` images (default 300, 30 per class) of the demo
dataset's training split (scikit-learn's digits, 8x8, the split of ``dist-sam make-demo-data``:
every fifth image is validation), chosen without randomness (the first ``train_size / 10`` of each
class in file order), with random shifts of up to one pixel as augmentation. The test set is every
other image, 1,797 − ``train_size`` of them, with clean labels: the 360 validation digits and the
unused training ones. Label noise flips a seeded fraction of the chosen training labels
(``dist_sam.data.demo.flip_labels``, noise seed 0).

Why this task: on the full 1,437 training digits every optimizer reaches 99.4–99.6% (the plain
study), so nothing can separate SAM from RW-SAM at 0% noise. With 30 images per class SGD stays
well below saturation, the test set is 4x larger (a test error is worth 0.07 points instead of 0.28),
and one run costs seconds on one CPU thread, so 5 seeds of every cell fit the budget.

Variants simulate ``workers_simulated = 4`` data-parallel workers of ``b = batch_size / 4`` in one
process, through the library's real modes (SPEC.md §2): ``*-local`` is ``ascent="micro",
micro_batch_size=b`` (exactly device-local ascent on 4 workers of b), ``m-sam`` is
``micro_batch_size=m``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import time
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["Task", "VARIANTS", "AXIS_USERS", "load_task_data", "resolve_m", "train_run"]

#: variant -> (optimizer, whether it is RW-SAM, mapping to the library)
VARIANTS: dict[str, tuple[str | None, bool, str]] = {
    "sgd": (None, False, "plain SGD on the global batch"),
    "sam-local": ("sam", False, "SAM, ascent='micro', m = b: SAM-local on 4 workers of b"),
    "rwsam-local": ("rwsam", True, "RW-SAM, ascent='micro', m = b: RW-SAM as the library runs it on 4 workers"),
    "m-sam": ("sam", False, "SAM, ascent='micro', m = the grid's m (m-SAM)"),
    "asam-local": ("asam", False, "ASAM (T = |w| + eta), ascent='micro', m = b"),
    "rwasam-local": ("rwsam", True, "RW-ASAM: RW-SAM with adaptive=True, ascent='micro', m = b"),
}
#: an axis of the grid applies only to the variants it changes (the others run once per value of the rest)
AXIS_USERS: dict[str, tuple[str, ...]] = {
    "noise": tuple(VARIANTS),
    "lam": ("rwsam-local", "rwasam-local"),
    "normalization": ("rwsam-local", "rwasam-local"),
    "estimator": ("rwsam-local", "rwasam-local"),
    "m": ("m-sam",),
}


@dataclasses.dataclass(kw_only=True)
class Task:
    """One training run's settings (a grid's ``set:`` and axes override these)."""

    train_size: int = 300
    noise: float = 0.0
    noise_seed: int = 0
    augment: bool = True
    epochs: int = 60
    max_steps_per_epoch: int | None = None  # quick mode cuts epochs short
    batch_size: int = 64
    workers_simulated: int = 4
    width: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    rho: float = 0.05
    asam_rho: float = 0.5
    asam_eta: float = 0.01
    lam: float = 0.5
    normalization: str = "zscore"
    estimator: str = "fd"
    mu: float | str = "auto"
    m: str = "b/4"  # m-SAM's micro-batch: "b" or "b/k"
    probe_every: int = 0  # RW variants: compare the estimate with exact norms every k steps (0: never)


def resolve_m(m: str | int, b: int) -> int:
    """``"b"``, ``"b/k"`` or an integer -> the micro-batch size; a ValueError unless it divides ``b``."""
    if isinstance(m, int) and not isinstance(m, bool):
        size = m
    elif isinstance(m, str) and (m == "b" or (m.startswith("b/") and m[2:].isdigit() and int(m[2:]) > 0)):
        size = b if m == "b" else b // int(m[2:]) if b % int(m[2:]) == 0 else 0
    else:
        size = 0
    if size < 1 or b % size:
        raise ValueError(f"m must be 'b', 'b/k' or an integer dividing the per-worker batch b = {b}, got {m!r}")
    return size


@functools.lru_cache(maxsize=8)
def load_task_data(train_size: int, noise: float, noise_seed: int = 0) -> dict[str, torch.Tensor]:
    """The few-shot split (module docstring) as normalized 3-channel 8x8 tensors in memory."""
    from sklearn.datasets import load_digits

    from dist_sam.data.demo import VAL_EVERY, flip_labels

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = np.asarray(digits.target, dtype=np.int64)
    train_pool = np.flatnonzero(np.arange(len(labels)) % VAL_EVERY != 0)
    # class c's k-th image is picked as the (k * 10 + c)-th: the first train_size in that order, ~train_size/10 per class
    rank_in_class = np.zeros(len(train_pool), dtype=np.int64)
    for c in range(10):
        of_c = labels[train_pool] == c
        rank_in_class[of_c] = np.arange(of_c.sum())
    order = np.lexsort((labels[train_pool], rank_in_class))
    train_ids = np.sort(train_pool[order[:train_size]])
    test_ids = np.setdiff1d(np.arange(len(labels)), train_ids)
    x = images.unsqueeze(1)
    mean, std = x[train_ids].mean(), x[train_ids].std()
    x = ((x - mean) / std).expand(-1, 3, -1, -1).contiguous()
    return dict(x_train=x[train_ids], y_train=torch.from_numpy(flip_labels(labels[train_ids], noise, noise_seed)),
                y_train_clean=torch.from_numpy(labels[train_ids]), x_test=x[test_ids],
                y_test=torch.from_numpy(labels[test_ids]), background=(0.0 - mean) / std,
                train_ids=torch.from_numpy(train_ids), test_ids=torch.from_numpy(test_ids))


def _shift(x: torch.Tensor, background: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by (dy, dx) in {-1, 0, 1}², filling with the background value."""
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (1, 1, 1, 1), value=float(background))
    d = torch.randint(0, 3, (n, 2), generator=gen)
    out = torch.empty_like(x)
    for dy in range(3):
        for dx in range(3):
            sel = (d[:, 0] == dy) & (d[:, 1] == dx)
            out[sel] = padded[sel, :, dy:dy + h, dx:dx + w]
    return out


def _optimizer(task: Task, variant: str, model: nn.Module) -> torch.optim.Optimizer:
    import dist_sam

    opt_name, is_rw, _ = VARIANTS[variant]
    base = dict(lr=task.lr, momentum=task.momentum, weight_decay=task.weight_decay)
    if opt_name is None:
        return torch.optim.SGD(model.parameters(), **base)
    adaptive = variant in ("asam-local", "rwasam-local")
    extra: dict[str, Any] = dict(rho=task.asam_rho, eta=task.asam_eta) if adaptive else dict(rho=task.rho)
    if is_rw:
        extra.update(lam=task.lam, normalization=task.normalization, estimator=task.estimator, adaptive=adaptive)
        if task.estimator == "fd":
            extra["mu"] = task.mu
    return dist_sam.create_optimizer(opt_name, model.parameters(), base="sgd", **base, **extra)


class _Probe:
    """Wraps an RW-SAM optimizer's ``ascent_loss``: every ``every`` steps, on the step's first
    micro-batch, the estimate ``s`` against exact per-sample norms (``torch.func``) of the same
    samples at the same weights: median relative error and Spearman rank correlation."""

    def __init__(self, opt, every: int) -> None:
        self.opt, self.every, self.calls, self.records = opt, every, 0, []
        self.original, self.per_step = opt.ascent_loss, None
        opt.ascent_loss = self

    def __call__(self, losses: torch.Tensor, **context: Any) -> torch.Tensor:
        from dist_sam.optim.estimators import exact_norms

        out = self.original(losses, **context)
        step, first = divmod(self.calls, self.per_step)
        self.calls += 1
        if first == 0 and step % self.every == 0 and self.opt.last_estimates is not None:
            module, s = context["module"], self.opt.last_estimates.double()
            ids = {id(p) for p in self.opt.params}
            named = {n: p for n, p in module.named_parameters() if id(p) in ids}
            exact = exact_norms(module, context["loss_fn"], context["inputs"], context["targets"], named).double()
            rel = ((s - exact).abs() / exact.clamp_min(1e-30)).median().item()
            rank = lambda t: t.argsort().argsort().double()  # noqa: E731 (no ties in continuous norms)
            rho = float(torch.corrcoef(torch.stack([rank(s), rank(exact)]))[0, 1])
            self.records.append(dict(step=step, median_rel_error=rel, spearman=rho))
        return out


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train_run(task: Task, variant: str, seed: int, *, val_size: int = 0) -> dict[str, Any]:
    """Train one model from ``seed`` (init, shuffling, augmentation); return its accuracies and cost.

    The same seed gives every variant the same initial weights, batch order and shifts. With
    ``val_size`` the cost grid's validation split (:func:`benchmarks.study.cost_run.load_split`:
    noisy labels, removed from the test set) is held out too, and ``val_acc`` reported.
    """
    import dist_sam
    from dist_sam.train.models import SmallCNN

    from .cost_run import load_split

    torch.set_num_threads(1)
    data = load_split(task.train_size, val_size, task.noise, task.noise_seed)
    torch.manual_seed(seed)
    model = SmallCNN(10, width=task.width)
    opt = _optimizer(task, variant, model)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    b_global, b = task.batch_size, task.batch_size // task.workers_simulated
    micro = resolve_m(task.m, b) if variant == "m-sam" else b
    probe = _Probe(opt, task.probe_every) if VARIANTS[variant][1] and task.probe_every else None
    if probe:
        probe.per_step = b_global // micro
    n = len(data["y_train"])
    steps_per_epoch = min(n // b_global, task.max_steps_per_epoch or n)
    total = task.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(seed)
    wall, cpu = time.perf_counter(), time.process_time()
    model.train()
    for _ in range(task.epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * b_global:(i + 1) * b_global]
            x, y = data["x_train"][idx], data["y_train"][idx]
            if task.augment:
                x = _shift(x, data["background"], gen)
            if VARIANTS[variant][0] is None:
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x), y).mean().backward()
                opt.step()
            else:
                dist_sam.sam_step(model, opt, loss_fn, x, y, ascent="micro", micro_batch_size=micro)
            schedule.step()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    model.eval()
    out = dict(variant=variant, seed=seed, epochs=task.epochs, steps=total, m=micro if VARIANTS[variant][0] else None,
               train_time_s=wall, train_cpu_s=cpu, cpu_s_per_epoch=cpu / task.epochs,
               test_acc=_accuracy(model, data["x_test"], data["y_test"]),
               val_acc=_accuracy(model, data["x_val"], data["y_val"]) if val_size else None,
               train_acc=_accuracy(model, data["x_train"], data["y_train"]),
               train_acc_clean=_accuracy(model, data["x_train"], data["y_train_clean"]),
               finite=all(bool(torch.isfinite(p).all()) for p in model.parameters()))
    if VARIANTS[variant][1] and task.estimator == "fd":
        out["mu"] = opt.mu
    if probe:
        out["probe"] = probe.records
        out["est_median_rel_error"] = statistics.median(r["median_rel_error"] for r in probe.records)
        out["est_spearman"] = statistics.median(r["spearman"] for r in probe.records)
    return out
