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
* LookSAM (:meth:`DeepSpeedStepEngine.install_looksam`): its rule runs inside DeepSpeed's step, on
  the gradients the base optimizer is handed: the module's ``.grad`` under ZeRO-0, this rank's
  flat fp32 partition under ZeRO-1/2 (where ``g_v`` lives too).
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

__all__ = ["DeepSpeedStepEngine", "check_looksam_config"]


def check_looksam_config(config: dict, stage: int) -> None:
    """What LookSAM under DeepSpeed cannot run, refused with the field that says so (before any work).

    Raises:
        ValueError: ZeRO-3, gradient accumulation, or fp16/bf16 at ZeRO-0 (whose wrapper optimizers
            keep their own flat fp32 copies).
    """
    if stage == 3:
        raise ValueError("sam.variant='looksam' is not supported under zero_optimization.stage=3 (accepted: 0, 1, 2)")
    gas = config.get("gradient_accumulation_steps", 1)
    if gas not in (1, None, "auto"):
        raise ValueError(f"gradient_accumulation_steps={gas!r} is not supported with sam.variant='looksam' under "
                         "DeepSpeed (accepted: 1; use a larger train_micro_batch_size_per_gpu)")
    precision = [name for name in ("fp16", "bf16") if isinstance(config.get(name), dict) and config[name].get("enabled")]
    if stage == 0 and precision:
        raise ValueError(f'"{precision[0]}": {{"enabled": true}} with zero_optimization.stage=0 is not supported with '
                         "sam.variant='looksam' (accepted: fp32 at stage 0, or stage 1/2 for fp16/bf16)")


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

    # -- LookSAM ------------------------------------------------------------------------------
    @property
    def _zero(self):
        """DeepSpeed's ZeRO-1/2 optimizer, or ``None`` (ZeRO-0: the base optimizer on the module)."""
        return self.engine.optimizer if self.engine.zero_optimization_stage() in (1, 2) else None

    def install_looksam(self, sam) -> None:
        """Run ``sam``'s rule on the gradients DeepSpeed hands its base optimizer, inside ``engine.step()``."""
        zero = self._zero
        if zero is not None and len(zero.bit16_groups) != 1:
            raise ValueError(f"LookSAM under ZeRO-{self.engine.zero_optimization_stage()} takes one param group, got "
                             f"{len(zero.bit16_groups)} (its inner products run over the whole gradient)")
        if self.engine.dp_world_size != collectives.world_size():
            raise ValueError("sam.variant='looksam' needs the data-parallel group to be the whole world")
        target = zero.optimizer if zero is not None else self.engine.optimizer
        original = target.step

        def step(*args: Any, **kwargs: Any) -> Any:
            if zero is None:
                grads = [p.grad for p in self.params]
            else:  # _optimizer_step narrows param_groups to the group being stepped: one flat partition
                grads = [p.grad for g in target.param_groups for p in g["params"]]
            sam.transform_(grads, grad_norm=self._zero_norm(), reduce=self.sum_partials)
            return original(*args, **kwargs)

        target.step = step

    def _zero_norm(self) -> torch.Tensor | None:
        """``||g||`` after DeepSpeed's clipping, from the norm its ZeRO step already took (no reduction)."""
        zero = self._zero
        norm = None if zero is None else getattr(zero, "_global_grad_norm", None)
        if norm is None:
            return None  # ZeRO-0: whole gradients, LookSAM takes their norm itself
        norm = torch.as_tensor(norm, dtype=torch.float64)
        clip = float(self.engine.gradient_clipping() or 0.0)
        if clip > 0:  # DeepSpeed's unscale_and_clip_grads: divided by max(1, (norm + 1e-6) / clip)
            norm = norm / torch.clamp((norm + 1e-6) / clip, min=1.0)
        return norm

    def all_reduce_mean_(self, tensors):
        """Average over the ranks in float32 or wider; ZeRO-1/2: return this rank's flat partition."""
        wide = [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors]
        collectives.all_reduce_mean_(wide)  # the data-parallel group is the world (checked at initialize)
        zero = self._zero
        if zero is None:
            return wide
        flat, part = zero.bit16_groups_flat[0], zero.parallel_partitioned_bit16_groups[0][collectives.rank()]
        start, size, item = (part.data_ptr() - flat.data_ptr()) // flat.element_size(), part.numel(), flat.element_size()
        master = zero.single_partition_of_fp32_groups[0]  # where the base optimizer's gradient lives (CPU offload too)
        out = torch.zeros(size, dtype=master.dtype, device=master.device)
        for p, t in zip(self.params, wide):  # each parameter's data is a view into the group's flat buffer
            off = (p.data_ptr() - flat.data_ptr()) // item
            lo, hi = max(off, start), min(off + p.numel(), start + size)
            if lo < hi and t.numel() == p.numel():  # an unused parameter's empty placeholder: zeros
                out[lo - start:hi - start] = t.reshape(-1)[lo - off:hi - off].to(out.device)
        return [out]

    def sum_partials(self, partial: torch.Tensor) -> torch.Tensor:
        if self._zero is not None:  # partitions of one gradient: sum across them
            collectives.all_reduce_sum_([partial])
        return partial

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
