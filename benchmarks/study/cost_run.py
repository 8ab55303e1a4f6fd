"""One run of the cost grid (``benchmarks.study.cost``): a method at one setting, one seed.

The task is the grids' few-shot digits (:mod:`benchmarks.study.task`) plus a **validation split**
held out of the demo's training split: the next ``val_size / 10`` digits per class in the same
order as the training ones, labels flipped at the same noise rate (noise seed + 1), so tuning sees
noisy labels as a user's held-out data would. It is removed from the test set, which stays clean.

A method is a dict (``benchmarks.study.cost.METHODS``): ``opt`` (``sgd``, ``sam``, ``rwsam``,
``looksam``, ``msam-fo``: first-order m-SAM, its groups of ``m``), ``m`` (the micro-batch: ``"b"`` is SAM-local on 4 workers of b, ``"b/k"`` m-SAM),
and optionally ``interval`` (a SAM step every k-th step), ``k`` (LookSAM's look period) and
``micro_impl`` (``vmap``: the batched m-SAM step, the same math as the loop). Every
pass the model takes is counted by :class:`PassCounter` (forward hooks), never taken from a formula.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import torch
from torch import nn

from .task import Task, _accuracy, _shift, load_task_data, resolve_m

__all__ = ["load_split", "build_model", "make_optimizer", "PassCounter", "micro_size", "step_fn", "batches", "train_model",
           "train_cost_run"]

NORMS = ("bn", "gn", "none")


@functools.lru_cache(maxsize=8)
def load_split(train_size: int, val_size: int, noise: float, noise_seed: int = 0) -> dict[str, torch.Tensor]:
    """Training set of :func:`load_task_data` (the same images and labels) + validation + test."""
    from dist_sam.data.demo import flip_labels

    data = dict(load_task_data(train_size, noise, noise_seed))
    if val_size <= 0:
        return data
    wider = load_task_data(train_size + val_size, 0.0, noise_seed)  # the first train+val of the same order
    is_val = ~torch.isin(wider["train_ids"], data["train_ids"])
    x_all = torch.cat([data["x_train"], data["x_test"]])  # x is normalized by the training set's mean/std
    ids_all = torch.cat([data["train_ids"], data["test_ids"]])
    pos = {int(i): j for j, i in enumerate(ids_all)}
    val_ids = wider["train_ids"][is_val]
    y_val_clean = wider["y_train_clean"][is_val]
    keep = ~torch.isin(data["test_ids"], val_ids)
    data.update(x_val=x_all[[pos[int(i)] for i in val_ids]], y_val_clean=y_val_clean, val_ids=val_ids,
                y_val=torch.from_numpy(flip_labels(y_val_clean.numpy(), noise, noise_seed + 1)),
                x_test=data["x_test"][keep], y_test=data["y_test"][keep], test_ids=data["test_ids"][keep])
    return data


def build_model(width: int, norm: str = "bn") -> nn.Module:
    """``SmallCNN`` (``bn``), or the same network with GroupNorm (``gn``, 8 groups) or no norm layer."""
    from dist_sam.train.models import SmallCNN

    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    model = SmallCNN(10, width=width)  # BN layers draw no random numbers: the convs start identical
    if norm != "bn":
        for i, layer in enumerate(model.features):
            if isinstance(layer, nn.BatchNorm2d):
                model.features[i] = nn.GroupNorm(8, layer.num_features) if norm == "gn" else nn.Identity()
    return model


def micro_size(method: dict, task: Task) -> int | None:
    """The method's micro-batch size on this task (None for SGD)."""
    return None if method["opt"] == "sgd" else resolve_m(method.get("m", "b"), task.batch_size // task.workers_simulated)


def make_optimizer(method: dict, params: dict, task: Task, model: nn.Module) -> torch.optim.Optimizer:
    """The method's optimizer at the setting ``params`` (``rho``, ``alpha``, ``lam``)."""
    import dist_sam

    base = dict(lr=task.lr, momentum=task.momentum, weight_decay=task.weight_decay)
    if method["opt"] == "sgd":
        return torch.optim.SGD(model.parameters(), **base)
    extra: dict[str, Any] = dict(rho=params["rho"])
    if method["opt"] == "rwsam":
        extra.update(lam=params["lam"], estimator="fd", mu="auto", normalization="zscore")
    if method["opt"] == "looksam":
        extra.update(k=method["k"], alpha=params["alpha"])
    if method.get("interval", 1) != 1:
        extra["interval"] = method["interval"]
    return dist_sam.create_optimizer(method["opt"], model.parameters(), base="sgd", **base, **extra)


class PassCounter:
    """Counts the samples each forward and each backward through ``model`` carries.

    A forward hook adds the batch size to ``forward``; when the output needs a gradient it gets a
    tensor hook that adds the batch size to ``backward`` when a gradient flows back through it
    (``backward()`` or ``autograd.grad`` alike). Calls are counted too: m-SAM's passes are as many
    samples as SAM's, in b/m times more calls.
    """

    def __init__(self, model: nn.Module) -> None:
        self.forward = self.backward = self.forward_calls = self.backward_calls = 0
        self._handle = model.register_forward_hook(self._on_forward)

    def _on_forward(self, module, inputs, output) -> None:
        n = output.shape[0]
        self.forward += n
        self.forward_calls += 1
        if output.requires_grad:
            output.register_hook(functools.partial(self._on_backward, n))

    def _on_backward(self, n: int, grad: torch.Tensor) -> None:
        self.backward += n
        self.backward_calls += 1

    def snapshot(self) -> tuple[int, int, int, int]:
        return self.forward, self.backward, self.forward_calls, self.backward_calls

    def remove(self) -> None:
        self._handle.remove()


def step_fn(method: dict, task: Task, model: nn.Module, opt, loss_fn):
    """``step(x, y)``: one optimizer step of the method."""
    import dist_sam

    m = micro_size(method, task)
    if m is None:
        def step(x, y):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).mean().backward()
            opt.step()
    else:
        impl = method.get("micro_impl", "loop")  # vmap: the same step, batched (m-SAM's cost on a CPU)

        def step(x, y):
            dist_sam.sam_step(model, opt, loss_fn, x, y, ascent="micro", micro_batch_size=m, micro_impl=impl)
    return step


def batches(data: dict, task: Task, seed: int):
    """The run's batches: ``epochs`` seeded permutations, shifted (the grids' order and augmentation)."""
    gen = torch.Generator().manual_seed(seed)
    n, b = len(data["y_train"]), task.batch_size
    per_epoch = min(n // b, task.max_steps_per_epoch or n)
    for _ in range(task.epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(per_epoch):
            idx = order[i * b:(i + 1) * b]
            x = data["x_train"][idx]
            yield (_shift(x, data["background"], gen) if task.augment else x), data["y_train"][idx]


def train_model(task: Task, method: dict, params: dict, seed: int, *, val_size: int, norm: str = "bn"):
    """Train once; ``(model in eval mode, data, {steps, train_cpu_s, forward_calls_per_step})``."""
    torch.set_num_threads(1)
    data = load_split(task.train_size, val_size, task.noise, task.noise_seed)
    torch.manual_seed(seed)
    model = build_model(task.width, norm)
    opt = make_optimizer(method, params, task, model)
    step = step_fn(method, task, model, opt, nn.CrossEntropyLoss(reduction="none"))
    steps = task.epochs * min(len(data["y_train"]) // task.batch_size, task.max_steps_per_epoch or len(data["y_train"]))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    counter = PassCounter(model)
    cpu = time.process_time()
    model.train()
    for x, y in batches(data, task, seed):
        step(x, y)
        schedule.step()
    cpu = time.process_time() - cpu
    counter.remove()
    model.eval()
    # samples per pass: the timing phase counts them (inside vmap a hook sees one micro-batch)
    return model, data, dict(steps=steps, train_cpu_s=cpu, forward_calls_per_step=counter.forward_calls / steps)


def train_cost_run(task: Task, method: dict, params: dict, seed: int, *, val_size: int, norm: str = "bn") -> dict[str, Any]:
    """Train once; validation and test accuracy, forward calls per step, CPU seconds."""
    model, data, info = train_model(task, method, params, seed, val_size=val_size, norm=norm)
    return dict(seed=seed, params=params, steps=info["steps"], m=micro_size(method, task), train_cpu_s=info["train_cpu_s"],
                val_acc=_accuracy(model, data["x_val"], data["y_val"]) if val_size else None,
                val_acc_clean=_accuracy(model, data["x_val"], data["y_val_clean"]) if val_size else None,
                test_acc=_accuracy(model, data["x_test"], data["y_test"]),
                train_acc=_accuracy(model, data["x_train"], data["y_train"]),
                forward_calls_per_step=info["forward_calls_per_step"],
                finite=all(bool(torch.isfinite(p).all()) for p in model.parameters()))
