"""The step core's engine interface: what differs between DDP, FSDP2 and DeepSpeed.

The loop (:mod:`dist_sam.core.loop`) drives a small per-engine interface (:class:`StepEngine`):

==========================  ============================================================
``ascent_pass(sync)``       context around the ascent forward and backward (local: no sync)
``forward(x, last=...)``    the forward as this engine runs it
``ascent_gradients(obj)``   backward of the ascent objective; the gradients, kept out of ``.grad``
``unscale_``, ``norm``      fp16 unscaling of those gradients; their global norm
``perturb(...)``            ``w <- w + e(g)`` wherever this engine keeps the weights it computes with
``descent_pass(last)``      context around the descent forward and backward (sync at the last group)
``backward(loss, last)``    the descent backward (the engine's reduction at the last group)
``restore(last)``           undo the perturbation (exactly: ``w`` swapped back, or nothing to undo)
``all_reduce_mean_``        average over the data-parallel ranks (LookSAM's look steps)
==========================  ============================================================

The finishing step (clipping, non-finite skip, base-optimizer step) differs per engine too and is
the engine's own ``finish``. An engine is built on the :class:`WrappedModel` it resolved once.
This module never imports ``torch.distributed``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
import weakref
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..compiled import LayerCapture
from ..optim.estimators import capture_layer
from ..optim.rules import global_norm
from ..optim.sam import SAM

__all__ = ["StepEngine", "WrappedModel", "AscentGrads", "stepping"]

#: ``(params, grads)``: the tensors the perturbation is computed on and added to, and ``g``.
AscentGrads = tuple[list[torch.Tensor], list[torch.Tensor | None]]


@dataclasses.dataclass(frozen=True)
class WrappedModel:
    """The model a step was given, resolved once by its engine (``dist_sam.distributed.wrapped.resolve``).

    Nothing below the engine unwraps a model: the loop, the optimizers and RW-SAM's estimators take
    the module they need from here.

    Attributes:
        model: what the user passed; its forward may communicate (DDP, a DeepSpeed engine).
        module: a forward without communication, compiled if the user compiled the module.
        eager: the user's module, inside every data-parallel and ``torch.compile`` wrapper
            (``torch.func`` transforms and layer lookups run on it).
        compiled: ``torch.compile`` wraps the module or the whole model.
        ddp: the ``DistributedDataParallel`` wrapper, or ``None``.
    """

    model: nn.Module
    module: nn.Module
    eager: nn.Module
    compiled: bool = False
    ddp: Any = None


class StepEngine:
    """How one engine runs the passes of a SAM step; subclasses override what differs.

    The defaults are those of a plain (single-process) module.

    Attributes:
        model, module, eager, compiled: the :class:`WrappedModel` the engine resolved.
    """

    def __init__(self, wrapped: WrappedModel) -> None:
        self.wrapped = wrapped
        self.model, self.module, self.eager, self.compiled = wrapped.model, wrapped.module, wrapped.eager, wrapped.compiled

    def capture(self, layer: nn.Module) -> contextlib.AbstractContextManager[Callable[[], tuple | None]]:
        """Context in which ``layer``'s forward is recorded; yields ``take()``, which returns the
        latest ``(input, output, layer)`` (detached) and forgets it.

        Eager: a forward hook for the duration. Compiled: one hook registered once and kept
        (dynamo does not guard on hooks, :class:`dist_sam.compiled.LayerCapture`).
        """
        if self.compiled:
            return _kept_capture(layer)
        return capture_layer(layer)

    def ascent_pass(self, sync: bool) -> contextlib.AbstractContextManager:
        """Context around the ascent forward and backward: no gradient sync unless ``sync``."""
        return contextlib.nullcontext()

    def forward(self, inputs: torch.Tensor, *, ascent: bool, last: bool) -> torch.Tensor:
        return self.model(inputs)

    def ascent_gradients(self, objective: torch.Tensor, optimizer: SAM) -> AscentGrads:
        """Backward of ``objective``; return ``(params, grads)`` with ``.grad`` left as it was."""
        raise NotImplementedError

    def check(self, optimizer: SAM) -> None:
        """Raise ``ValueError`` for an optimizer this engine cannot drive (before any work)."""

    def loss_context(self) -> dict[str, Any]:
        """Extra context for ``optimizer.ascent_loss`` (e.g. which tensors RW-SAM's estimators use)."""
        return {}

    def unscale_(self, grads: Sequence[torch.Tensor], inv_scale: torch.Tensor) -> None:
        """Divide fp16-scaled ascent gradients by the loss scale, in place (before :meth:`norm`)."""
        torch._foreach_mul_(list(grads), inv_scale)

    def norm(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """``||g||`` over every tensor this rank perturbs with (float32 or wider)."""
        return global_norm(list(grads))

    def perturb(self, optimizer: SAM, params: list[torch.Tensor], grads: list[torch.Tensor | None],
                norm: torch.Tensor, *, first: bool, owned: bool) -> None:
        """``w <- w + e(g)``. ``first``: the step's first group; ``owned``: ``grads`` may be overwritten."""
        optimizer.perturb(grads, inplace=owned, grad_norm=norm)

    def descent_pass(self, last: bool) -> contextlib.AbstractContextManager:
        """Context around the descent forward and backward; the gradient syncs at the ``last`` group."""
        return contextlib.nullcontext()

    def all_reduce_mean_(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Average whole-parameter tensors over the data-parallel ranks (in place where the layout
        allows) and return them in the layout of :meth:`local_grads`. One process: as given."""
        return tensors

    def local_grads(self, optimizer: SAM) -> list[torch.Tensor | None]:
        """The gradients this rank's base step sees (``.grad``; a sharded engine's local shards)."""
        return [p.grad for p in optimizer.params]

    def sum_partials(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum a small tensor of partial sums over the shards of one gradient (whole tensors: itself)."""
        return partial

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        loss.backward()

    def restore(self, optimizer: SAM, *, last: bool) -> None:
        """Back to ``w`` (between groups, ``last=False``) or at the end of the passes (``last=True``)."""
        optimizer.restore()

    def finish(self, optimizer: SAM, clip_grad_norm: float | None, scaler: Any = None) -> None:
        """Clip the synced descent gradient, skip a non-finite step, step the base optimizer."""
        params = optimizer.params
        if scaler is not None:
            scaler.unscale_(optimizer)
            if clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
            before = optimizer.num_steps
            with stepping(optimizer, self):
                scaler.step(optimizer)  # skips (on every rank: the gradients are synced) on inf/NaN
            scaler.update()
            if optimizer.num_steps == before:  # skipped: keep counting steps for `interval` and seeds
                optimizer.num_steps += 1
        else:
            if clip_grad_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
            else:
                norm = global_norm([p.grad for p in params if p.grad is not None])
            if torch.isfinite(norm):
                clipped = norm if clip_grad_norm is None else None  # LookSAM recomputes a clipped one
                with stepping(optimizer, self, clipped):
                    optimizer.step()
            else:
                warnings.warn("non-finite gradient: the step was skipped and the weights left untouched",
                              stacklevel=4)
                optimizer.num_steps += 1
        optimizer.zero_grad(set_to_none=True)


def stepping(optimizer: SAM, engine: StepEngine, grad_norm: torch.Tensor | None = None):
    """Context of a base step: the optimizer's view of ``engine`` (LookSAM: its gradients' layout, ``||g||``)."""
    return optimizer.stepping_with(engine, grad_norm)


_KEPT: "weakref.WeakKeyDictionary[nn.Module, LayerCapture]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _kept_capture(layer: nn.Module) -> Iterator[Callable[[], tuple | None]]:
    capture = _KEPT.setdefault(layer, LayerCapture())
    capture.attach(layer)
    capture.value = None
    yield capture.take
