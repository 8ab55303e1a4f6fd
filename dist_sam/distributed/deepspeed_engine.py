"""The DeepSpeed engine of the step core (ZeRO 0, 1 and 2).

DeepSpeed refuses ``no_sync()`` under ZeRO-2 (and ZeRO-1 with ``overlap_comm``), so "local" never
goes through the engine:

* ascent: ``torch.autograd.grad`` of the loss of ``engine.module(x)``; the gradients are returned,
  never accumulated into ``.grad``, so ZeRO's gradient hooks (which reduce) never fire;
* perturb/restore: on the module's own parameters (bf16 under bf16), with SAM's exact backup;
* descent: groups before the last take ``autograd.grad`` of ``module(x)`` and sum locally; the last
  group runs ``engine(x)`` and one ``engine.backward``, the only gradient reduction, as in SGD.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..core import AscentGrads, StepEngine
from . import collectives

__all__ = ["DeepSpeedStepEngine"]


class DeepSpeedStepEngine(StepEngine):
    """Drives a ``DeepSpeedEngine`` through :func:`dist_sam.core.sam_passes`.

    Args:
        engine: the DeepSpeed engine.
        params: the parameters SAM perturbs (those of its SAM-family object).
    """

    def __init__(self, engine: Any, params: list[torch.Tensor]) -> None:
        super().__init__(engine, engine.module)
        self.engine, self.params = engine, params
        self._accumulated: list[torch.Tensor | None] = [None] * len(params)
        self._sync_ascent = False

    def ascent_pass(self, sync: bool) -> contextlib.AbstractContextManager:
        self._sync_ascent = sync
        return torch.enable_grad()

    def forward(self, inputs: torch.Tensor, *, ascent: bool, last: bool) -> torch.Tensor:
        # engine(x) arms DeepSpeed's backward hooks: only for the one reduced pass.
        return self.engine(inputs) if (last and not ascent) else self.module(inputs)

    def ascent_gradients(self, objective: torch.Tensor, optimizer) -> AscentGrads:
        grads = list(torch.autograd.grad(objective, self.params, allow_unused=True))
        if self._sync_ascent:
            grads = [torch.zeros_like(p) if t is None else t for p, t in zip(self.params, grads)]
            collectives.all_reduce_mean_(grads)
        return self.params, grads

    def descent_pass(self, last: bool) -> contextlib.AbstractContextManager:
        return torch.enable_grad()

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        if not last:  # an m-SAM group: its descent gradient, summed locally (no reduction)
            h = torch.autograd.grad(loss, self.params, allow_unused=True)
            for i, t in enumerate(h):
                if t is not None:
                    a = self._accumulated[i]
                    self._accumulated[i] = t.float() if a is None else a.add_(t)
            return
        # sum(p * a) with a detached has gradient a whatever p is: one engine.backward hands
        # DeepSpeed (1/c) Σ_j h_j and reduces it once.
        for p, a in zip(self.params, self._accumulated):
            if a is not None:
                loss = loss + (p * a.to(p.dtype)).sum()
        self._accumulated = [None] * len(self.params)
        self.engine.backward(loss)
