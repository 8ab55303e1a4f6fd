"""Batched first-order m-SAM (``micro_impl="vmap"``): all ``c`` group gradients in one pass.

The exact gradient of ``(1/c) Σ_j [L_j(w) + rho ||g_j(w)||]`` (:mod:`.first_order`) as::

    g = vmap(grad(L), in_dims=(None, 0))(w, x_j)            # (c, ...): every g_j, differentiable in w
    u = stop_grad(g / (||g_j|| + eps_norm))                  # per-group norms, one pass
    h = (g.sum(0) + rho * autograd.grad(<g, u>, w)) / c      # one backward: Σ_j H_j u_j

BatchNorm in training mode runs a decomposed forward here (batch mean and biased variance by
plain ops, the affine map after): the Hessian-vector products through the batching rule of
``native_batch_norm`` came out wrong under torch 2.14.1 (0.1-1% off the loop and a finite
difference in float64; first-order gradients are right). Each group still normalizes with its
own batch statistics, and the running statistics get the loop's ``c`` sequential updates from
the groups' statistics, returned out of the transform. Refusals as :func:`~.batched.check_batchable`.
Nothing here communicates: under DDP the caller all-reduces the returned gradients.
"""

from __future__ import annotations

import contextlib
import types
from typing import Callable, Iterator

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .batched import _named
from .rules import EPS_NORM
from .sam import SAM

__all__ = ["batched_penalty_grads"]


def _decomposed_forward(sink: list):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(self.weight.dtype) if self.weight is not None else x  # as _bn_in_weight_dtype
        dims = [0, *range(2, x.dim())]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        n = x.numel() // x.shape[1]
        sink.append((self, mean.detach(), var.detach() * (n / max(n - 1, 1))))  # the loop's unbiased update
        shape = (1, -1, *[1] * (x.dim() - 2))
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(dtype)
    return forward


@contextlib.contextmanager
def _decomposed_bn(module: nn.Module, sink: list) -> Iterator[None]:
    """Training-mode BatchNorm layers of ``module`` run :func:`_decomposed_forward` (records into ``sink``)."""
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in layers:
        m.forward = types.MethodType(_decomposed_forward(sink), m)
    try:
        yield
    finally:
        for m in layers:
            del m.forward


def _update_running_stats(records: list, c: int) -> None:
    """The loop's updates ``r <- (1 - mo) r + mo s_j``, group by group, from stacked ``(c, C)`` statistics."""
    with torch.no_grad():
        for j in range(c):
            for m, mean, var in records:
                if m.track_running_stats and m.running_mean is not None:
                    mo = float(m.momentum)
                    m.running_mean.mul_(1 - mo).add_(mean[j].to(m.running_mean.dtype), alpha=mo)
                    m.running_var.mul_(1 - mo).add_(var[j].to(m.running_var.dtype), alpha=mo)
                    m.num_batches_tracked.add_(1)


def batched_penalty_grads(
    model: nn.Module,
    optimizer: SAM,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    micro_batch_size: int,
    rho: float,
    *,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """First-order m-SAM's gradient ``(1/c) Σ_j [g_j + rho H_j g_j / (||g_j|| + eps_norm)]``.

    Args:
        model: the user's eager module (no DDP or ``torch.compile`` wrapper).
        optimizer: a :class:`~dist_sam.optim.first_order.FirstOrderMSAM` (its parameters).
        loss_fn: per-sample losses.
        inputs: the batch, ``b`` a multiple of ``micro_batch_size``; ``targets``: its targets.
        micro_batch_size: ``m``, the group size.
        rho: the penalty's weight.
        autocast: context factory entered around the forward.

    Returns:
        ``(grads, losses)``: one gradient per :attr:`SAM.params` entry, and the ``b`` losses at ``w``.
        BatchNorm running statistics end as the loop leaves them.
    """
    leaves = {n: p.requires_grad_() for n, p in _named(model, optimizer).items()}  # detached views of w
    c = inputs.shape[0] // micro_batch_size
    xs, ys = inputs.unflatten(0, (c, micro_batch_size)), targets.unflatten(0, (c, micro_batch_size))
    sink: list = []

    def group_loss(p, x, y):
        sink.clear()
        with autocast():
            losses = loss_fn(functional_call(model, p, (x,)), y)
        stats = [(mean, var) for _, mean, var in sink]  # out of the transform through aux
        return losses.mean(), (losses.detach(), stats)

    with _decomposed_bn(model, sink):
        g, (losses, stats) = vmap(grad(group_loss, has_aux=True), in_dims=(None, 0, 0))(leaves, xs, ys)
    records = [(m, mean, var) for (m, *_), (mean, var) in zip(sink, stats)]
    _update_running_stats(records, c)
    wide = torch.float64 if any(t.dtype == torch.float64 for t in g.values()) else torch.float32
    norms = torch.stack([t.detach().flatten(1).to(wide).pow(2).sum(1) for t in g.values()]).sum(0).sqrt()  # (c,)
    inv = 1.0 / (norms + EPS_NORM)
    penalty = sum((t.to(wide) * (t.detach().to(wide) * inv.view(-1, *[1] * (t.dim() - 1)))).sum() for t in g.values())
    hvp = torch.autograd.grad(penalty, list(leaves.values()), allow_unused=True)  # Σ_j H_j u_j, one backward
    grads = [(g[n].detach().sum(0) + (0 if h is None else rho * h.to(g[n].dtype))) / c
             for n, h in zip(leaves, hvp)]
    return [t.to(p.dtype) for t, p in zip(grads, optimizer.params)], losses.flatten()
