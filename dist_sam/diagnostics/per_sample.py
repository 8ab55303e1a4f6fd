"""``per_sample_grad_norms``: ``||∇f_i(w)||`` of every sample, for a plain or DDP-wrapped model.

The per-sample machinery (``torch.func``, bounded chunks) is the algorithm's own, in
:mod:`dist_sam.optim.per_sample`; RW-SAM's estimators use it too.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..distributed.wrapped import resolve
from ..optim.per_sample import (LossFn, has_dropout, iter_batches, named_trainable, per_sample_grad_chunks,
                                samples_coupled, squared_norms)

__all__ = ["iter_batches", "named_trainable", "samples_coupled", "has_dropout", "per_sample_grad_chunks",
           "per_sample_grad_norms"]


def per_sample_grad_norms(
    model: nn.Module,
    loss_fn: LossFn,
    data,
    *,
    params: Iterable[torch.Tensor] | None = None,
    chunk_size: int = 64,
) -> torch.Tensor:
    """``||∇f_i(w)||`` (one global norm over ``params``) for every sample of ``data``.

    Args:
        model: plain or DDP-wrapped; the wrapped module runs without any communication.
        loss_fn: per-sample losses of shape ``(b,)`` (``reduction="none"``).
        data: an ``(x, y)`` pair or an iterable of ``(x, y)`` batches.
        params: the parameters whose gradient counts (default: every trainable one).
        chunk_size: most per-sample gradients held in memory at once.

    Returns:
        A 1-D float32 (float64 for float64 models) tensor, this rank's samples in order.
    """
    module = resolve(model).eager
    named = named_trainable(module, params)
    norms = []
    for x, y in iter_batches(data):
        for _, grads in per_sample_grad_chunks(module, loss_fn, x, y, named, chunk_size=chunk_size):
            norms.append(squared_norms(grads).sqrt())
    return torch.cat(norms)
