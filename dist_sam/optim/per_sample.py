"""Per-sample gradients through ``torch.func``, materialized in bounded chunks.

``f_i(w)`` is sample ``i``'s loss as the model computes it. When samples are independent (no
BatchNorm normalizing with batch statistics) that is the loss of ``x_i`` alone, and
``vmap(grad(f))`` over single samples gives every ``∇f_i`` at the cost of one batched backward.
A training-mode BatchNorm couples the samples of a batch, so ``f_i`` is then the ``i``-th entry of
the batch's loss vector and ``∇f_i`` is a row of its Jacobian: one forward of the whole batch and
a ``vmap`` of its vector-Jacobian product over unit cotangents. Both paths hold at most
``chunk_size`` per-sample gradients at a time.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.func import functional_call, grad, vjp, vmap

from ..bn import frozen_running_stats

__all__ = ["iter_batches", "named_trainable", "samples_coupled", "has_dropout", "per_sample_grad_chunks",
           "squared_norms"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def iter_batches(data) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches from one ``(x, y)`` pair or from an iterable of pairs."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        yield data[0], data[1]
        return
    for x, y in data:
        yield x, y


def named_trainable(module: nn.Module, params: Iterable[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``{name: parameter}`` of ``module``'s trainable parameters, or of those in ``params``."""
    keep = None if params is None else {id(p) for p in params}
    return {n: p for n, p in module.named_parameters()
            if p.requires_grad and (keep is None or id(p) in keep)}


def samples_coupled(module: nn.Module) -> bool:
    """True when a training-mode BatchNorm mixes the samples of a batch."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in module.modules())


def has_dropout(module: nn.Module) -> bool:
    """True when a training-mode dropout layer draws random masks in the forward."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0 for m in module.modules())


def _independent_chunks(module, loss_fn, x, y, params, chunk_size):
    def loss_one(p, xi, yi):
        return loss_fn(functional_call(module, p, (xi.unsqueeze(0),)), yi.unsqueeze(0)).sum()

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0), randomness="different")
    detached = {n: p.detach() for n, p in params.items()}
    for start in range(0, x.shape[0], chunk_size):
        sl = slice(start, min(start + chunk_size, x.shape[0]))
        yield sl, per_sample(detached, x[sl], y[sl])


def _coupled_chunks(module, loss_fn, x, y, params, chunk_size):
    def losses_of(p):
        return loss_fn(functional_call(module, p, (x,)), y)

    losses, pullback = vjp(losses_of, {n: p.detach() for n, p in params.items()})
    eye = torch.eye(x.shape[0], dtype=losses.dtype, device=losses.device)
    for start in range(0, x.shape[0], chunk_size):
        sl = slice(start, min(start + chunk_size, x.shape[0]))
        yield sl, vmap(pullback)(eye[sl])[0]  # rows of the Jacobian of the loss vector


def per_sample_grad_chunks(
    module: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    *,
    chunk_size: int = 64,
    coupled: bool | None = None,
) -> Iterator[tuple[slice, dict[str, torch.Tensor]]]:
    """Yield ``(samples, {name: grads})`` with ``grads[k] = ∇_name f_{samples[k]}(w)``.

    Args:
        module: the (unwrapped) model; its BatchNorm running statistics are left untouched.
        loss_fn: per-sample losses ``loss_fn(outputs, targets)`` of shape ``(b,)``.
        x: inputs, ``b`` samples along dim 0.
        y: targets.
        params: the parameters to differentiate, by name in ``module``.
        chunk_size: most per-sample gradients held at once.
        coupled: force the Jacobian path (``True``) or the single-sample path (``False``); by
            default the Jacobian path is taken when :func:`samples_coupled` says so.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    coupled = samples_coupled(module) if coupled is None else coupled
    chunks = _coupled_chunks if coupled else _independent_chunks
    with frozen_running_stats(module):
        yield from chunks(module, loss_fn, x, y, dict(params), chunk_size)


def squared_norms(grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``Σ_params ||g_i||²`` per sample, in float32 or wider."""
    dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads.values()) else torch.float32
    return sum(g.flatten(1).to(dtype).pow(2).sum(1) for g in grads.values())
