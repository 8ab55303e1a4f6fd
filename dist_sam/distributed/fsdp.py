"""The FSDP2 engine of the step core: exact device-local SAM on ``fully_shard`` models.

The perturbation never touches the sharded weights. It lives on FSDP's *unsharded* copies, which
are rank-private and never written back (``../shared/docs/FSDP.md``):

``fsdp_memory="resident"`` (default; the note's L0)
    The ascent runs with gradient sync, reshard-after-forward and reshard-after-backward off, so
    every unit stays unsharded; ``g_k = autograd.grad`` of the rank's own loss (no reduce-scatter);
    ``e_k`` is added in place to the unsharded parameters; the descent runs with sync on, its
    forward all-gathers nothing and its backward reduce-scatters ``∇L_k(w + e_k)`` and reshards,
    which frees the perturbed copies. Per step: one all-gather and one reduce-scatter per unit,
    fewer than a default plain FSDP2 step (two all-gathers). Peak: one unsharded copy of the
    parameters plus, transiently, one full local gradient.
``fsdp_memory="lean"`` (the note's L1)
    The ascent reshards as plain FSDP2 does; ``g_k`` is kept (it becomes ``e_k`` in place) and a
    forward pre-hook adds each unit's ``e_k`` right after the descent's all-gather, freeing it unit
    by unit. One all-gather more per step than plain FSDP2, about one full-size buffer less than
    ``resident``. SAM, USAM and RW-SAM ``last_layer`` only: ASAM and the ``fd``/``exact``
    estimators need the full weights, which this mode does not keep.
``ascent="global"``
    The reduce-scattered mean gradient perturbs the sharded weights (norm across shards, one
    scalar all-reduce), restored exactly from a copy of the shards.

Every descent is reduce-scattered (gradient accumulation: one reduce-scatter per chunk), unless the
caller turned gradient sync off around the step (``set_requires_gradient_sync(False)``, as Hugging
Face Trainer's ``no_sync`` does for all but a window's last micro-batch): then the descent keeps
it off, FSDP accumulates the unsharded gradient, and the window's last descent reduce-scatters the
sum once, as a plain FSDP2 step does. Clipping
and the non-finite check use the gradient norm across shards (one scalar all-reduce), so every
rank skips a non-finite step together. Reads FSDP2's per-group flags to restore each unit's own
reshard-after-forward and sync settings after the step (checked at start-up).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from ..core import AscentGrads, StepEngine, stepping
from . import collectives
from .wrapped import resolve

__all__ = ["FSDPEngine", "FSDP_MEMORY"]

FSDP_MEMORY = ("resident", "lean")


def _groups(unit: FSDPModule) -> list:
    state = unit._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None or not all(hasattr(g, "post_forward_mesh_info") and hasattr(g, "reduce_grads")
                                 for g in groups):
        raise RuntimeError(f"dist_sam's FSDP2 engine needs torch 2.14's FSDP2 internals; found torch {torch.__version__}")
    return groups


class FSDPEngine(StepEngine):
    """Runs :func:`dist_sam.core.sam_passes` on a model sharded with ``fully_shard`` (root included)."""

    def __init__(self, model: nn.Module, *, memory: str = "resident") -> None:
        if not isinstance(model, FSDPModule):
            raise ValueError(f"{type(model).__name__}: call fully_shard on the root module too (FSDP2 needs it), "
                             "after its submodules")
        if memory not in FSDP_MEMORY:
            raise ValueError(f"fsdp_memory must be one of {FSDP_MEMORY}, got {memory!r}")
        super().__init__(resolve(model))
        self.memory = memory
        self.units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for unit in self.units:
            _groups(unit)
        self._sharded = {n: p for n, p in model.named_parameters() if p.requires_grad}  # fqn -> DTensor
        if not all(isinstance(p, DTensor) for p in self._sharded.values()):
            raise ValueError("the model's parameters are not all sharded: call sam_step between steps (not "
                             "inside a forward), with fully_shard applied to every module that owns parameters")
        self.names = list(self._sharded)
        self._owned = self._unit_params()  # unit -> fqns of the parameters it owns
        self._unsharded: dict[str, torch.Tensor] = {}  # fqn -> unsharded parameter, captured in forward
        self._pending: dict[str, torch.Tensor] = {}  # lean: fqn -> e, added at the unit's all-gather
        self._phase: str | None = None  # "capture" (ascent) | "apply" (lean descent)
        self._saved: list | None = None
        self._caller_sync = True  # the sync setting the step found (all groups), kept by the descent
        self._sync_ascent = False
        self._backup: list[torch.Tensor] | None = None  # global: exact copy of the perturbed shards
        self._perturbed: list[torch.Tensor] | None = None
        for unit in self.units:
            unit.register_forward_pre_hook(self._pre_forward)  # after FSDP's own (prepended) all-gather

    @classmethod
    def for_model(cls, model: nn.Module, *, scaler: Any = None, ascent: str = "local",
                  fsdp_memory: str = "resident") -> "FSDPEngine":
        """The model's engine (built once, kept on the model), checked for this step's options."""
        if scaler is not None:
            raise ValueError("scaler: GradScaler (fp16 loss scaling) is not supported under FSDP2; use "
                             "MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)")
        if ascent == "full":
            raise ValueError("ascent='full' (n-SAM) is not supported under FSDP2; accepted: 'local', 'micro', 'global'")
        engines = model.__dict__.setdefault("_dist_sam_fsdp_engines", {})  # one per mode: hooks registered once
        if fsdp_memory not in engines:
            engines[fsdp_memory] = cls(model, memory=fsdp_memory)
        return engines[fsdp_memory]

    def check(self, optimizer) -> None:
        """Refuse what this mode cannot run exactly, before any work (ValueError naming it)."""
        ours = {id(p) for p in self._sharded.values()}
        if any(id(p) not in ours for p in optimizer.params):
            raise ValueError("the optimizer has parameters that are not the FSDP2 model's sharded parameters "
                             "(ignored_params, another model, or built before fully_shard); build it on "
                             "model.parameters() after fully_shard")
        if self.memory == "lean":
            if optimizer.defaults.get("adaptive"):
                raise ValueError("fsdp_memory='lean' cannot run ASAM: its T = |w| + eta needs the full weights, "
                                 "which only fsdp_memory='resident' keeps; use 'resident'")
            if getattr(optimizer, "lam", 0) != 0 and getattr(optimizer, "estimator", None) in ("fd", "exact"):
                raise ValueError(f"fsdp_memory='lean' cannot run RW-SAM's {optimizer.estimator!r} estimator: its "
                                 "extra forwards need the full weights; use fsdp_memory='resident' or "
                                 "estimator='last_layer'")

    # -- bookkeeping ------------------------------------------------------------------------
    def _unit_params(self) -> dict:
        """Each unit's own parameters (not its nested units'), by fully qualified name from the root."""
        fqn_of = {id(p): n for n, p in self._sharded.items()}
        owned = {}
        for unit in self.units:
            nested = {id(p) for m in unit.modules() if m is not unit and isinstance(m, FSDPModule)
                      for p in m.parameters()}
            owned[unit] = [fqn_of[id(p)] for p in unit.parameters() if id(p) not in nested and id(p) in fqn_of]
        return owned

    def _pre_forward(self, unit: nn.Module, args: Any) -> None:
        # Runs after FSDP's own pre-forward (prepended): the unit's parameters are unsharded here.
        if self._phase == "capture":  # the first forward of the ascent; RW-SAM's extra ones find them
            for fqn in self._owned[unit]:
                if fqn not in self._unsharded:
                    self._unsharded[fqn] = self.model.get_parameter(fqn)
        elif self._phase == "apply":
            with torch.no_grad():
                for fqn in self._owned[unit]:
                    e = self._pending.pop(fqn, None)  # once per step: an AC recompute finds none
                    if e is not None:
                        self.model.get_parameter(fqn).add_(e)

    def _set(self, *, sync: bool, reshard_after_forward: bool | None, reshard_after_backward: bool) -> None:
        if self._saved is None:  # each unit's own settings, put back by restore(last=True)
            self._saved = ([(g, g.post_forward_mesh_info, g.reduce_grads, g.reshard_after_backward)
                            for u in self.units for g in _groups(u)],
                           [(u, u._get_fsdp_state()._auto_reshard_after_forward) for u in self.units])
            self._caller_sync = all(reduce for _, _, reduce, _ in self._saved[0])  # the descent's sync
        for unit in self.units:
            unit.set_requires_gradient_sync(sync, recurse=False)
            unit.set_reshard_after_backward(reshard_after_backward, recurse=False)
            if reshard_after_forward is not None:
                unit.set_reshard_after_forward(reshard_after_forward, recurse=False)

    def _reset(self) -> None:
        self._phase, self._pending, self._unsharded = None, {}, {}
        for unit in self.units:
            unit.reshard()  # drops perturbed copies left by an interrupted pass (no-op otherwise)
        if self._saved is not None:
            groups, units = self._saved
            for group, mesh, reduce, rab in groups:
                group.post_forward_mesh_info, group.reduce_grads, group.reshard_after_backward = mesh, reduce, rab
            for unit, auto in units:
                unit._get_fsdp_state()._auto_reshard_after_forward = auto
        self._saved = None

    # -- the step-core interface ------------------------------------------------------------
    @contextlib.contextmanager
    def ascent_pass(self, sync: bool) -> Iterator[None]:
        self._sync_ascent = sync
        if sync:  # global: plain reduce-scatter; units stay gathered through RW-SAM's extra forwards
            self._set(sync=True, reshard_after_forward=False, reshard_after_backward=True)
        elif self.memory == "resident":
            self._set(sync=False, reshard_after_forward=False, reshard_after_backward=False)
        else:
            self._set(sync=False, reshard_after_forward=None, reshard_after_backward=True)
        self._phase, self._unsharded = "capture", {}
        try:
            yield
        finally:
            self._phase = None

    def ascent_gradients(self, objective: torch.Tensor, optimizer) -> AscentGrads:
        if self._sync_ascent:
            params = optimizer.params
            stash = [p.grad for p in params]  # descent gradients of earlier chunks
            for p in params:
                p.grad = None
            objective.backward()
            grads = [p.grad for p in params]
            for p, g in zip(params, stash):
                p.grad = g
            return [p.to_local() for p in params], [None if g is None else g.to_local() for g in grads]
        params = [self._unsharded[n] for n in self.names]
        return params, list(torch.autograd.grad(objective, params, allow_unused=True))

    def loss_context(self) -> dict:
        """RW-SAM's estimators run on the unsharded parameters (resident during the ascent)."""
        return {"named_params": lambda: {n: self._unsharded[n] for n in self.names}}

    def norm(self, grads) -> torch.Tensor:
        local = super().norm(grads)
        if not self._sync_ascent:
            return local  # g_k is this rank's own full gradient: no communication
        total = local.square()
        dist.all_reduce(total)  # shards of one gradient: the norm across them
        return total.sqrt()

    def perturb(self, optimizer, params, grads, norm, *, first: bool, owned: bool) -> None:
        groups = self._param_groups(optimizer, params)
        live = [(p, g, grp) for p, g, grp in zip(params, grads, groups) if g is not None]
        if not live:
            return
        ps, gs, grps = (list(x) for x in zip(*live))
        e = optimizer.compute_perturbation(gs, ps, grps, inplace=True, grad_norm=norm, norm_fn=self.norm)
        with torch.no_grad():
            if self._sync_ascent:  # the sharded weights themselves: keep an exact copy
                if self._backup is None or len(self._backup) != len(ps):
                    self._backup = [torch.empty_like(p) for p in ps]
                torch._foreach_copy_(self._backup, ps)
                self._perturbed = ps
                torch._foreach_add_(ps, e)
            elif self.memory == "resident":
                torch._foreach_add_(ps, e)  # rank-private unsharded copies, freed by the descent's reshard
            else:
                names = [n for n, g in zip(self.names, grads) if g is not None]
                self._pending = dict(zip(names, e))
        # the descent syncs unless the caller turned sync off (an accumulation window's earlier micro-batch)
        self._set(sync=self._caller_sync, reshard_after_forward=False, reshard_after_backward=True)
        self._phase = "apply" if self.memory == "lean" and not self._sync_ascent else None

    def _param_groups(self, optimizer, params) -> list[dict]:
        """The optimizer's param group of each perturbed tensor (rho, eta may differ per group)."""
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        if self._sync_ascent:  # local shards of optimizer.params, in its order
            return [group_of[id(p)] for p in optimizer.params]
        return [group_of[id(self._sharded[n])] for n in self.names]

    def restore(self, optimizer, *, last: bool) -> None:
        if self._perturbed is not None:
            with torch.no_grad():
                torch._foreach_copy_(self._perturbed, self._backup)
            self._perturbed = None
        if last:
            self._reset()

    # -- LookSAM: its g_v lives in the gradient's shards, in the order of self.names ---------------
    def all_reduce_mean_(self, tensors):
        """Average the full per-parameter tensors (names order) over the mesh; return this rank's shards."""
        sharded = [self._sharded[n] for n in self.names]
        wide = [t.to(p.dtype) for t, p in zip(tensors, sharded)]  # the shards' dtype (bf16 compute: fp32)
        collectives.all_reduce_mean_(wide, group=sharded[0].device_mesh.get_group())
        # each rank slices its own shard of the (now identical) full tensor: no communication
        return [distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=None).to_local()
                if t.shape == p.shape else None for t, p in zip(wide, sharded)]  # None: an unused parameter

    def local_grads(self, optimizer) -> list:
        return [None if self._sharded[n].grad is None else self._sharded[n].grad.to_local() for n in self.names]

    def sum_partials(self, partial: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(partial, group=next(iter(self._sharded.values())).device_mesh.get_group())
        return partial

    def finish(self, optimizer, clip_grad_norm: float | None, scaler: Any = None) -> None:
        """Clip with the norm across shards; a non-finite norm skips the step on every rank."""
        grads = [p.grad.to_local() for p in optimizer.params if p.grad is not None]
        square = (super().norm(grads) if grads else torch.zeros(())).square()
        dist.all_reduce(square)
        norm = square.sqrt()
        if not torch.isfinite(norm):
            warnings.warn("non-finite gradient: the step was skipped and the weights left untouched", stacklevel=4)
            optimizer.num_steps += 1
        else:
            if clip_grad_norm is not None:
                coef = torch.clamp(clip_grad_norm / (norm + 1e-6), max=1.0)
                torch._foreach_mul_(grads, coef)
                norm = norm * coef
            with stepping(optimizer, self, norm):  # LookSAM's off step reuses this norm: no extra reduction
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
