"""Curvature and gradient-noise diagnostics (SPEC.md §4, the paper's Table 6).

* ``tr Σ = (1/|S|) Σ_i ||∇f_i(w) − ∇f_S(w)||²``: the trace of the stochastic-gradient-noise
  covariance over the samples ``S`` of ``data``, from per-sample gradients in bounded chunks.
* ``tr H``: Hutchinson's estimator ``E_v[vᵀ H v]`` of the trace of the Hessian of ``f_S``, with
  Rademacher probes ``v`` and Hessian-vector products by double backward.

Both accept a plain or DDP-wrapped model (the wrapped module runs, so nothing communicates until
the optional final ``all_reduce``), never touch BatchNorm running statistics, and accumulate in
float64.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, NamedTuple

import torch
from torch import nn

from ..bn import frozen_running_stats
from ..distributed.collectives import all_reduce_sum_
from ..distributed.wrapped import resolve
from ..optim.per_sample import iter_batches, named_trainable, per_sample_grad_chunks, samples_coupled, squared_norms

__all__ = ["HessianTrace", "sgn_covariance_trace", "hessian_trace"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class HessianTrace(NamedTuple):
    """Hutchinson's estimate of ``tr H``.

    Attributes:
        mean: the mean of ``vᵀ H v`` over the probes.
        stderr: its standard error, ``std(vᵀ H v) / sqrt(num_probes)`` (``nan`` for one probe).
        num_probes: the number of Rademacher probes.
    """

    mean: float
    stderr: float
    num_probes: int


def sgn_covariance_trace(
    model: nn.Module,
    loss_fn: LossFn,
    data,
    *,
    params: Iterable[torch.Tensor] | None = None,
    chunk_size: int = 64,
    all_reduce: bool = False,
) -> float:
    """``tr Σ`` over every sample of ``data`` (SPEC.md §4).

    Computed as ``(1/|S|) Σ_i ||∇f_i||² − ||(1/|S|) Σ_i ∇f_i||²`` in one pass, in float64.

    Args:
        model: plain or DDP-wrapped.
        loss_fn: per-sample losses of shape ``(b,)`` (``reduction="none"``).
        data: an ``(x, y)`` pair or an iterable of ``(x, y)`` batches.
        params: the parameters whose gradients count (default: every trainable one).
        chunk_size: most per-sample gradients held in memory at once.
        all_reduce: sum the statistics across ranks first (one collective), so every rank gets
            the trace over the union of the ranks' samples.

    Returns:
        The trace, a Python float.
    """
    module = resolve(model).eager
    named = named_trainable(module, params)
    device = next(iter(named.values())).device
    sum_sq = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    sum_g = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in named.items()}
    for x, y in iter_batches(data):
        for samples, grads in per_sample_grad_chunks(module, loss_fn, x, y, named, chunk_size=chunk_size):
            sum_sq += squared_norms(grads).double().sum()
            count += samples.stop - samples.start
            for n, g in grads.items():
                sum_g[n] += g.double().sum(0)
    if all_reduce:
        all_reduce_sum_([sum_sq, count, *sum_g.values()])
    mean_sq = sum(((g / count) ** 2).sum() for g in sum_g.values())  # ||∇f_S||²
    return (sum_sq / count - mean_sq).item()


def _probe(params: list[torch.Tensor], seed: int, k: int) -> list[torch.Tensor]:
    """Rademacher probe ``k``: the same on every batch and every rank for a given ``seed``."""
    gen = {}
    out = []
    for p in params:
        if p.device not in gen:
            gen[p.device] = torch.Generator(device=p.device).manual_seed(seed * 1_000_003 + k)
        r = torch.randint(0, 2, p.shape, generator=gen[p.device], device=p.device, dtype=p.dtype)
        out.append(r.mul_(2).sub_(1))
    return out


def _probe_sums(module, loss_fn, x, y, params, num_probes, seed, probe_batch=32) -> torch.Tensor:
    """``vₖᵀ (Σ_i ∇²f_i) vₖ`` for every probe ``k``: one forward, one graph-building backward, then
    Hessian-vector products by double backward, ``probe_batch`` probes at a time (vmapped)."""
    losses = loss_fn(module(x), y)
    grads = torch.autograd.grad(losses.sum(), params, create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    if not live:  # the loss is at most linear in the parameters
        return torch.zeros(num_probes, dtype=torch.float64, device=params[0].device)
    out = []
    for start in range(0, num_probes, probe_batch):
        probes = [_probe(params, seed, k) for k in range(start, min(start + probe_batch, num_probes))]
        v = [torch.stack([p[i] for p in probes]) for i in live]
        hv = torch.autograd.grad([grads[i] for i in live], [params[i] for i in live], grad_outputs=v,
                                 retain_graph=True, allow_unused=True, is_grads_batched=True)
        out.append(sum((h.double() * vi).flatten(1).sum(1) for h, vi in zip(hv, v) if h is not None))
    return torch.cat(out)


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    data,
    num_probes: int = 100,
    *,
    params: Iterable[torch.Tensor] | None = None,
    seed: int = 0,
    chunk_size: int | None = None,
    all_reduce: bool = False,
) -> HessianTrace:
    """Hutchinson's estimate of the trace of the Hessian of ``f_S`` (the mean loss over ``data``).

    Args:
        model: plain or DDP-wrapped.
        loss_fn: per-sample losses of shape ``(b,)`` (``reduction="none"``).
        data: an ``(x, y)`` pair or an iterable of ``(x, y)`` batches.
        num_probes: Rademacher probes ``K >= 1`` (``K >= 2`` for a standard error).
        params: the parameters of the Hessian (default: every trainable one).
        seed: seeds the probes; every batch and rank uses the same probes.
        chunk_size: split batches into pieces of at most this many samples to bound memory.
            Ignored when a training-mode BatchNorm couples the samples (the batch is the unit).
        all_reduce: sum the per-probe statistics across ranks first (one collective).

    Returns:
        A :class:`HessianTrace` ``(mean, stderr, num_probes)``.
    """
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"num_probes must be an integer >= 1, got {num_probes!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size!r}")
    module = resolve(model).eager
    params_list = list(named_trainable(module, params).values())
    split = chunk_size is not None and not samples_coupled(module)
    totals = torch.zeros(num_probes + 1, dtype=torch.float64, device=params_list[0].device)  # sums, count
    with frozen_running_stats(module), torch.enable_grad():
        for x, y in iter_batches(data):
            pieces = zip(x.split(chunk_size), y.split(chunk_size)) if split else [(x, y)]
            for xc, yc in pieces:
                totals[:num_probes] += _probe_sums(module, loss_fn, xc, yc, params_list, num_probes, seed)
                totals[num_probes] += xc.shape[0]
    if all_reduce:
        all_reduce_sum_([totals])
    quad = totals[:num_probes] / totals[num_probes]
    stderr = quad.std().item() / math.sqrt(num_probes) if num_probes > 1 else float("nan")
    return HessianTrace(mean=quad.mean().item(), stderr=stderr, num_probes=num_probes)
