"""The DDP engine of the step core, and which engine runs a model: DDP (or a plain module) or FSDP2.

DeepSpeed builds its own engine (:mod:`dist_sam.deepspeed`); every engine drives the one loop of
:mod:`dist_sam.core`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from ..core import AscentGrads, StepEngine
from .ddp import check_model, local_module, no_grad_sync

__all__ = ["engine_for", "is_fsdp", "DDPEngine"]


def _swap_grads(params: list[torch.Tensor], grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Set ``p.grad = grads[i]`` and return what was there (pointer swaps, no copies)."""
    old = [p.grad for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    return old


class DDPEngine(StepEngine):
    """A DDP-wrapped or plain module: ``no_sync()`` makes a pass local; ``w`` is swapped back exactly.

    The ascent backward accumulates into ``.grad`` under ``no_sync()`` (so DDP's reducer sees a
    local pass, ``gradient_as_bucket_view`` included): into the optimizer's zeroed
    :meth:`~dist_sam.SAM.ascent_buffers`, swapped in and out of ``.grad`` around it, leaving the
    descent gradients accumulated so far in place. The same buffers then receive ``w + e``: no
    gradient memory is allocated per micro-batch (fresh buffers made the CPU allocator return
    and re-fault ~P bytes per micro-batch, the bulk of m-SAM's overhead at small m).
    """

    def __init__(self, model: nn.Module) -> None:
        check_model(model)
        super().__init__(model, local_module(model))  # compiled if the user compiled it (dist_sam.compiled)

    def ascent_pass(self, sync: bool) -> contextlib.AbstractContextManager:
        return no_grad_sync(self.model, enabled=not sync)

    def ascent_gradients(self, objective: torch.Tensor, optimizer) -> AscentGrads:
        params = optimizer.params
        stash = _swap_grads(params, optimizer.ascent_buffers())  # descent gradients accumulated so far
        objective.backward()
        return params, _swap_grads(params, stash)

    def descent_pass(self, last: bool) -> contextlib.AbstractContextManager:
        return no_grad_sync(self.model, enabled=not last)




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
