"""ZeRO-3 device-local SAM: the perturbation lives on the gathered parameters (FSDP.md §5).

Under ZeRO-3 a parameter is whole only while DeepSpeed has gathered it (``ds_status ==
AVAILABLE``); outside it ``p.data`` is empty and the rank holds a shard in ``p.ds_tensor``.

* Ascent gradient: ``torch.autograd.grad`` of the loss of ``engine.module(x)``. It never
  accumulates into ``.grad``, so ZeRO-3's reduce hooks (post-accumulate-grad hooks) never fire:
  the gradients are whole, local, and the only collectives are DeepSpeed's parameter all-gathers.
* Perturbation ``e``: whole tensors, one per parameter. :class:`Zero3Perturbation` writes
  ``w + e`` into each parameter's *gathered* data: at :meth:`~Zero3Perturbation.apply` for
  parameters gathered then (ZeRO-3's persistent parameters, never released, among them), and
  after DeepSpeed gathers one later: a forward pre-hook registered after DeepSpeed's fetch hook,
  and, for a re-gather in the backward, an identity autograd function on the module's outputs
  that sits inside DeepSpeed's ``PreBackwardFunction`` (its backward runs right after the fetch).
* Release: DeepSpeed's ``partition()`` frees the gathered copy and never writes it back, so a
  released parameter's shard is still ``w``; the wrapper on ``p.partition`` drops it from the
  perturbed set. ``w + e`` is always a new tensor (the gathered data can alias the shard), so
  :meth:`~Zero3Perturbation.undo` puts the untouched original back (never subtracts ``e``).

This relies on DeepSpeed 0.19.8's ``ds_status``, ``ds_persist`` and ``partition`` attributes
and on its hook order; :func:`dist_sam.distributed.ds_fp16.check_version` refuses other versions.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any, Iterator, Sequence

import torch
from torch import nn

__all__ = ["Zero3Perturbation", "is_gathered"]


def is_gathered(param: torch.Tensor) -> bool:
    """Whether DeepSpeed holds the whole of ``param`` on this rank now."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return param.ds_status == ZeroParamStatus.AVAILABLE


class _ReapplyAfterRegather(torch.autograd.Function):
    """Identity; its backward (after DeepSpeed's re-gather of ``module``) re-applies ``e``."""

    @staticmethod
    def forward(ctx, owner, module, *tensors):
        ctx.owner, ctx.module = owner, module
        return tuple(t.view_as(t) for t in tensors) if len(tensors) > 1 else tensors[0].view_as(tensors[0])

    @staticmethod
    def backward(ctx, *grads):
        ctx.owner._apply_to(ctx.module.parameters(recurse=False))
        return (None, None, *grads)


class Zero3Perturbation:
    """``w + e`` on ZeRO-3's gathered parameters of ``module``, exactly undone.

    Args:
        module: ``engine.module`` of a ZeRO-3 engine (its parameters carry ``ds_status``).

    The hooks stay registered (inactive between steps); :meth:`remove` takes them out.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.params = [p for p in module.parameters() if p.requires_grad]
        self._e: dict[int, torch.Tensor] = {}  # id(param) -> e, while active
        self._backup: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (param, exact copy)
        self.released = 0  # perturbed parameters DeepSpeed released (e re-applied at a re-gather)
        self._handles = []
        for sub in module.modules():
            if any(True for _ in sub.parameters(recurse=False)):
                self._handles.append(sub.register_forward_pre_hook(self._pre_forward))
                self._handles.append(sub.register_forward_hook(self._wrap_outputs, prepend=True))
        self._originals = {}
        for p in module.parameters():
            self._originals[id(p)] = p.partition
            p.partition = self._partition_wrapper(p, p.partition)

    @property
    def active(self) -> bool:
        """True between :meth:`apply` and :meth:`undo`."""
        return bool(self._e)

    def apply(self, perturbation: Sequence[torch.Tensor | None]) -> None:
        """Start ``w <- w + e`` (aligned with :attr:`params`; ``None`` leaves a parameter alone)."""
        if self.active:
            raise RuntimeError("apply() called twice without undo()")
        if len(perturbation) != len(self.params):
            raise ValueError(f"expected {len(self.params)} perturbation tensors, got {len(perturbation)}")
        self._e = {id(p): e for p, e in zip(self.params, perturbation) if e is not None}
        self._apply_to(self.params)

    def undo(self) -> None:
        """``w <- copy`` for every parameter still gathered and perturbed; stop perturbing."""
        for param, original in self._backup.values():
            param.data = original
        self._backup.clear()
        self._e = {}

    @contextlib.contextmanager
    def whole_module(self) -> Iterator[None]:
        """Every parameter gathered (read-only) and the module's forward hooks suspended.

        For RW-SAM's ``fd`` and ``exact`` estimators: their extra forwards run through
        ``torch.func.functional_call`` on substituted weights, which ZeRO-3's fetch hooks cannot
        handle. Inside, ``p`` is whole; on exit DeepSpeed frees what it gathered (no write-back).
        """
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.module.parameters())):
            saved = [(m, m._forward_pre_hooks, m._forward_hooks) for m in self.module.modules()]
            try:
                for m, _, _ in saved:
                    m._forward_pre_hooks, m._forward_hooks = OrderedDict(), OrderedDict()
                yield
            finally:
                for m, pre, post in saved:
                    m._forward_pre_hooks, m._forward_hooks = pre, post

    def remove(self) -> None:
        """Take the hooks and the ``partition`` wrappers out (after :meth:`undo`)."""
        self.undo()
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- internals ---------------------------------------------------------------------------
    @torch.no_grad()
    def _apply_to(self, params) -> None:
        for p in params:
            key = id(p)
            if key in self._e and key not in self._backup and is_gathered(p):
                # w + e in a new tensor: the gathered data may alias the shard (world size 1,
                # persistent parameters), which must stay w; the original is the exact copy.
                original = p.data
                p.data = original + self._e[key].to(p.dtype).view_as(original)
                self._backup[key] = (p, original)

    def _pre_forward(self, module: nn.Module, args: Any) -> None:
        if self.active:
            self._apply_to(module.parameters(recurse=False))

    def _wrap_outputs(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not self.active or not torch.is_grad_enabled():
            return output
        if isinstance(output, torch.Tensor):
            return _ReapplyAfterRegather.apply(self, module, output) if output.requires_grad else output
        if isinstance(output, tuple) and all(isinstance(t, torch.Tensor) for t in output):
            live = [i for i, t in enumerate(output) if t.requires_grad]
            if live:
                wrapped = _ReapplyAfterRegather.apply(self, module, *(output[i] for i in live))
                wrapped = wrapped if isinstance(wrapped, tuple) else (wrapped,)
                out = list(output)
                for i, t in zip(live, wrapped):
                    out[i] = t
                return tuple(out)
        return output

    def _partition_wrapper(self, param: torch.Tensor, partition):
        def wrapped(param_list=None, *args, **kwargs):
            for p in param_list if param_list is not None else [param]:
                if self._backup.pop(id(p), None) is not None:
                    self.released += 1  # its shard is still w; a re-gather gets e again
            return partition(param_list, *args, **kwargs)

        return wrapped
