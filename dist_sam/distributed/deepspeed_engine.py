"""The DeepSpeed engine of the step core (ZeRO 0, 1, 2 and 3; fp32, bf16, fp16).

DeepSpeed refuses ``no_sync()`` under ZeRO-2 (and ZeRO-1 with ``overlap_comm``), so "local" never
goes through the engine:

* ascent: ``torch.autograd.grad`` of the loss of ``engine.module(x)``; the gradients are returned,
  never accumulated into ``.grad``, so ZeRO's gradient hooks (which reduce) never fire;
* perturb/restore: on the module's own parameters (bf16 under bf16), with SAM's exact backup;
* descent: groups before the last take ``autograd.grad`` of ``module(x)`` and sum locally; the last
  group runs ``engine(x)`` and one ``engine.backward``, the only gradient reduction, as in SGD.
* fp16 (:mod:`.ds_fp16`): every extra pass is scaled as ``engine.backward`` scales a loss and
  unscaled in float32 before the norm; DeepSpeed's own overflow check and loss scaler decide.
* ZeRO-3 (:mod:`.zero3`): the perturbation lives on the gathered parameters, not in-place on the
  (empty) module parameters; RW-SAM's ``fd``/``exact`` ascent runs on all parameters gathered.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch

from ..core import AscentGrads, StepEngine
from . import collectives, ds_fp16
from .wrapped import resolve
from .zero3 import Zero3Perturbation

__all__ = ["DeepSpeedStepEngine"]


class DeepSpeedStepEngine(StepEngine):
    """Drives a ``DeepSpeedEngine`` through :func:`dist_sam.core.sam_passes`.

    Args:
        engine: the DeepSpeed engine.
        params: the parameters SAM perturbs (those of its SAM-family object).
    """

    def __init__(self, engine: Any, params: list[torch.Tensor], config: Any = None) -> None:
        super().__init__(dataclasses.replace(resolve(engine.module), model=engine))  # engine(x) reduces
        self.engine, self.params = engine, params
        self._accumulated: list[torch.Tensor | None] = [None] * len(params)
        self._sync_ascent = False
        self.zero3 = Zero3Perturbation(engine.module) if engine.zero_optimization_stage() == 3 else None
        # RW-SAM's functional estimators need whole parameters outside ZeRO-3's hooks
        self._whole_ascent = self.zero3 is not None and config is not None and config.variant == "rwsam" \
            and config.estimator != "last_layer"

    def ascent_pass(self, sync: bool) -> contextlib.AbstractContextManager:
        self._sync_ascent = sync
        if not self._whole_ascent:
            return torch.enable_grad()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.enable_grad())
        stack.enter_context(self.zero3.whole_module())
        return stack

    def forward(self, inputs: torch.Tensor, *, ascent: bool, last: bool) -> torch.Tensor:
        # engine(x) arms DeepSpeed's backward hooks: only for the one reduced pass.
        return self.engine(inputs) if (last and not ascent) else self.module(inputs)

    def ascent_gradients(self, objective: torch.Tensor, optimizer) -> AscentGrads:
        scale = ds_fp16.loss_scale(self.engine)  # fp16: the engine's own current loss scale
        if scale is not None:
            objective = ds_fp16.scale_loss(self.engine, objective)
        grads = list(torch.autograd.grad(objective, self.params, allow_unused=True))
        if self._sync_ascent:
            grads = [torch.zeros_like(p) if t is None else t for p, t in zip(self.params, grads)]
            collectives.all_reduce_mean_(grads)
        if scale is not None:
            grads = ds_fp16.unscale(grads, scale)  # before the norm; inf/NaN stay (they poison)
        return self.params, grads

    def perturb(self, optimizer, params, grads, norm, *, first: bool, owned: bool) -> None:
        if self.zero3 is None:
            return super().perturb(optimizer, params, grads, norm, first=first, owned=owned)
        live = [(i, p, t, group) for i, (p, t, group) in enumerate(zip(params, grads, optimizer._group_of_params()))
                if t is not None and group["rho"] != 0]
        e: list[torch.Tensor | None] = [None] * len(params)
        if live:
            idx, ps, gs, groups = (list(x) for x in zip(*live))
            for i, t in zip(idx, optimizer.compute_perturbation(gs, ps, groups, grad_norm=norm)):
                e[i] = t
        self.zero3.apply(e)  # written into each parameter's gathered data (now and at each gather)

    def restore(self, optimizer, *, last: bool) -> None:
        if self.zero3 is None:
            return super().restore(optimizer, last=last)
        self.zero3.undo()

    def descent_pass(self, last: bool) -> contextlib.AbstractContextManager:
        return torch.enable_grad()

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        if not last:  # an m-SAM group: its descent gradient, summed locally (no reduction)
            scale = ds_fp16.loss_scale(self.engine)
            if scale is None:
                h = torch.autograd.grad(loss, self.params, allow_unused=True)
            else:
                scaled = ds_fp16.scale_loss(self.engine, loss)
                h = ds_fp16.unscale(torch.autograd.grad(scaled, self.params, allow_unused=True), scale)
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
        self.engine.backward(ds_fp16.descent_loss(self.engine, loss))  # ZeRO-0 fp16: pre-scaled
