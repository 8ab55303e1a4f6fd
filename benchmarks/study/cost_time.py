"""The cost grid's timing phase: step time of every method relative to SGD, interleaved, one run.

    python -m benchmarks.study --grid cost --phase time    # rerun on a quiet machine

Every method gets its own model and optimizer (seed 0) on the cost task's batches. After a warm-up,
``rounds`` rounds each run every method for ``steps`` steps (rounded up to whole cycles of its
``k`` / ``interval``), in an order that rotates from round to round. A method's cost is the median
over rounds of (its mean step time / SGD's mean step time in that round), so a load change on a
shared machine hits both sides of a ratio. Each step is also classified by the passes the
:class:`~benchmarks.study.cost_run.PassCounter` saw it take (a counter is on every model, SGD's
too): LookSAM's one-pass off-steps are timed on their own against SGD. The passes per step are
counted here too, over the timed steps; a ``vmap`` method's are its loop twin's (inside vmap a
hook sees one micro-batch of the batched call).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import Any

import torch
from torch import nn

from .cost_run import PassCounter, batches, build_model, load_split, make_optimizer, step_fn
from .task import Task

__all__ = ["time_methods"]


def _cycle(method: dict) -> int:
    return math.lcm(method.get("k", 1), method.get("interval", 1))


def _bench(task: Task, method: dict, params: dict, val_size: int):
    data = load_split(task.train_size, val_size, task.noise, task.noise_seed)
    torch.manual_seed(0)
    model = build_model(task.width)
    opt = make_optimizer(method, params, task, model)
    step = step_fn(method, task, model, opt, nn.CrossEntropyLoss(reduction="none"))
    counter = PassCounter(model)
    long_task = Task(**{**vars(task), "epochs": 10_000})
    stream = batches(data, long_task, 0)
    model.train()
    return step, counter, stream


def _run_steps(step, counter: PassCounter, stream, n: int) -> list[tuple[float, int]]:
    """Time ``n`` steps one by one; ``(seconds, samples forwarded)`` per step."""
    out = []
    for _ in range(n):
        x, y = next(stream)
        before = counter.forward
        start = time.perf_counter()
        step(x, y)
        out.append((time.perf_counter() - start, counter.forward - before))
    return out


def time_methods(task: Task, methods: dict[str, dict], params: dict[str, dict], *, val_size: int, rounds: int,
                 steps: int, warmup: int, log=print) -> dict[str, Any]:
    """Interleaved step times (module docstring); ``methods`` must include ``sgd``."""
    torch.set_num_threads(1)
    if "sgd" not in methods:
        raise ValueError(f"time_methods needs 'sgd' among the methods, got {list(methods)}")
    benches = {name: _bench(task, m, params[name], val_size) for name, m in methods.items()}
    n_steps = {name: _cycle(m) * math.ceil(steps / _cycle(m)) for name, m in methods.items()}
    for name, (step, counter, stream) in benches.items():
        _run_steps(step, counter, stream, max(warmup, _cycle(methods[name])))
    names = list(methods)
    per_round: dict[str, list[list[tuple[float, int]]]] = {n: [] for n in names}
    counted = {n: [0, 0, 0, 0] for n in names}  # forward, backward samples and calls over the timed steps
    started, load = time.time(), list(os.getloadavg())
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            step, counter, stream = benches[name]
            before = counter.snapshot()
            per_round[name].append(_run_steps(step, counter, stream, n_steps[name]))
            counted[name] = [c + a - b for c, a, b in zip(counted[name], counter.snapshot(), before)]
        log(f"[study cost time] round {r + 1}/{rounds} ({time.time() - started:.0f}s)")
    b = task.batch_size
    sgd_mean = [statistics.mean(t for t, _ in rnd) for rnd in per_round["sgd"]]
    out: dict[str, Any] = dict(rounds=rounds, steps=n_steps, warmup=warmup, load_average=load,
                               load_average_end=list(os.getloadavg()), wall_s=time.time() - started, methods={})
    for name in names:
        means = [statistics.mean(t for t, _ in rnd) for rnd in per_round[name]]
        total = rounds * n_steps[name]
        row = dict(step_ms=1e3 * statistics.median(means), forward_per_step=counted[name][0] / (b * total),
                   backward_per_step=counted[name][1] / (b * total), forward_calls_per_step=counted[name][2] / total,
                   backward_calls_per_step=counted[name][3] / total,
                   ratio_vs_sgd=statistics.median(m / s for m, s in zip(means, sgd_mean)),
                   ratio_per_round=[m / s for m, s in zip(means, sgd_mean)])
        off = [[t for t, f in rnd if f == b] for rnd in per_round[name]]
        look = [[t for t, f in rnd if f > b] for rnd in per_round[name]]
        if methods[name].get("opt") == "looksam" and all(off):
            row["off_step_ratio_vs_sgd"] = statistics.median(statistics.mean(o) / s for o, s in zip(off, sgd_mean))
            row["off_steps_per_cycle"] = len(off[0]) * _cycle(methods[name]) // n_steps[name]
        if methods[name].get("opt") == "looksam" and all(look):
            row["look_step_ratio_vs_sgd"] = statistics.median(statistics.mean(o) / s for o, s in zip(look, sgd_mean))
        out["methods"][name] = row
    for name in names:  # hooks inside vmap see one micro-batch: the loop twin's counts are the method's
        if methods[name].get("micro_impl") == "vmap" and name + " (loop)" in out["methods"]:
            twin = out["methods"][name + " (loop)"]
            out["methods"][name].update({k: twin[k] for k in twin if "per_step" in k}, passes_counted_on=name + " (loop)")
    return out
