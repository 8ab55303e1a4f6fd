"""The DDP engine of the step core, and which engine runs a model: DDP (or a plain module) or FSDP2.

DeepSpeed builds its own engine (:mod:`dist_sam.deepspeed`); every engine drives the one loop of
:mod:`dist_sam.core`.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from torch import nn

from ..core import AscentGrads, StepEngine
from ..optim.rules import global_norm
from . import collectives
from .ddp import check_model, ddp_of, local_module, no_grad_sync

__all__ = ["engine_for", "is_fsdp", "DDPEngine"]


def _swap_grads(params: list[torch.Tensor], grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Set ``p.grad = grads[i]`` and return what was there (pointer swaps, no copies)."""
    old = [p.grad for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    return old


class DDPEngine(StepEngine):
    """A DDP-wrapped or plain module: ``no_sync()`` makes a pass local; ``w`` is swapped back exactly.

    The ascent gradient lands in the optimizer's :meth:`~dist_sam.SAM.ascent_buffers`, which then
    receive ``w + e``: no gradient memory is allocated per micro-batch (fresh buffers made the CPU
    allocator return and re-fault ~P bytes per micro-batch, the bulk of m-SAM's overhead at small
    m). A local ascent runs ``torch.autograd.grad`` (no ``.grad`` is touched, DDP's reducer never
    fires) with a hook per parameter that copies its gradient into its buffer and takes its norm
    while the gradient is fresh in cache. A synchronized ascent (``global``) accumulates into the
    zeroed buffers through ``.grad`` under DDP's reducer, swapped out of ``.grad`` right after,
    leaving the descent gradients accumulated so far in place.
    """

    def __init__(self, model: nn.Module) -> None:
        check_model(model)
        super().__init__(model, local_module(model))  # compiled if the user compiled it (dist_sam.compiled)
        self._sync = False
        self._norms: tuple[list[torch.Tensor], list[torch.Tensor | None]] | None = None  # (grads, their norms)

    def ascent_pass(self, sync: bool) -> contextlib.AbstractContextManager:
        self._sync = sync
        return no_grad_sync(self.model, enabled=not sync)

    def ascent_gradients(self, objective: torch.Tensor, optimizer) -> AscentGrads:
        params = optimizer.params
        if self._sync:
            stash = _swap_grads(params, optimizer.ascent_buffers())  # descent gradients accumulated so far
            objective.backward()
            return params, _swap_grads(params, stash)
        buffers = optimizer.ascent_buffers(zero=False)
        norms: list[torch.Tensor | None] = [None] * len(params)

        def capture(i: int, grad: torch.Tensor) -> torch.Tensor:
            norms[i] = torch.linalg.vector_norm(grad, dtype=torch.float64 if grad.dtype == torch.float64 else torch.float32)
            return buffers[i].copy_(grad)

        hooks = [p.register_hook(functools.partial(capture, i)) for i, p in enumerate(params)]
        try:
            grads = list(torch.autograd.grad(objective, params, allow_unused=True))
        finally:
            for h in hooks:
                h.remove()
        self._norms = ([g for g in grads if g is not None], [n for n in norms if n is not None])
        return params, grads

    def unscale_(self, grads, inv_scale) -> None:
        super().unscale_(grads, inv_scale)
        if self._norms is not None:
            self._norms = (self._norms[0], [n * inv_scale.to(n.dtype) for n in self._norms[1]])

    def norm(self, grads) -> torch.Tensor:
        cached, self._norms = self._norms, None
        if cached is None or len(cached[0]) != len(grads) or len(cached[1]) != len(grads) or any(
                a is not b for a, b in zip(cached[0], grads)):
            return super().norm(grads)
        return global_norm(cached[1])  # the norm of the per-tensor norms

    def descent_pass(self, last: bool) -> contextlib.AbstractContextManager:
        return no_grad_sync(self.model, enabled=not last)

    def all_reduce_mean_(self, tensors):
        """One all-reduce over DDP's own group, as DDP's reducer makes it (a plain module: none)."""
        ddp = ddp_of(self.model)
        if ddp is not None:
            collectives.all_reduce_mean_(tensors, group=ddp.process_group)
        return tensors


def is_fsdp(model: nn.Module) -> bool:
    """True if ``model`` or any submodule was sharded with ``torch.distributed.fsdp.fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def engine_for(model: nn.Module, *, scaler: Any = None, ascent: str = "local", **options: Any) -> StepEngine:
    """The engine of ``model``: :class:`~dist_sam.distributed.fsdp.FSDPEngine` for an FSDP2 model
    (``options`` are its options), else :class:`~dist_sam.distributed.ddp.DDPEngine`.

    Raises:
        ValueError: a combination the engine cannot run, before any work.
    """
    if is_fsdp(model):
        from .fsdp import FSDPEngine

        return FSDPEngine.for_model(model, scaler=scaler, ascent=ascent, **options)
    if options:
        raise ValueError(f"{sorted(options)} apply to FSDP2 models only; {type(model).__name__} is not sharded")
    return DDPEngine(model)
