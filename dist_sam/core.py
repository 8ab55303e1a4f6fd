"""The SAM step core: ascent -> perturb -> descent -> restore, once, for every engine.

One loop (:func:`sam_passes`) drives a small per-engine interface (:class:`StepEngine`). An engine
says only what differs between DDP, FSDP2 and DeepSpeed:

==========================  ============================================================
``ascent_pass(sync)``       context around the ascent forward and backward (local: no sync)
``forward(x, last=...)``    the forward as this engine runs it
``ascent_gradients(obj)``   backward of the ascent objective; the gradients, kept out of ``.grad``
``unscale_``, ``norm``      fp16 unscaling of those gradients; their global norm
``perturb(...)``            ``w <- w + e(g)`` wherever this engine keeps the weights it computes with
``descent_pass(last)``      context around the descent forward and backward (sync at the last group)
``backward(loss, last)``    the descent backward (the engine's reduction at the last group)
``restore(last)``           undo the perturbation (exactly: ``w`` swapped back, or nothing to undo)
==========================  ============================================================

The finishing step (clipping, non-finite skip, base-optimizer step) differs per engine too and is
the engine's own ``finish``; this module never imports ``torch.distributed``.

A non-finite ascent gradient poisons the descent loss (``loss * NaN``): the engine's gradient
reduction then carries the NaN to every rank, so every rank skips the step together, with no extra
communication.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .bn import frozen_running_stats
from .optim.looksam import LookSAM
from .optim.rules import global_norm
from .optim.sam import SAM

__all__ = ["StepEngine", "AscentGrads", "sam_passes", "plain_passes", "per_sample_losses", "stepping", "LossFn"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``(params, grads)``: the tensors the perturbation is computed on and added to, and ``g``.
AscentGrads = tuple[list[torch.Tensor], list[torch.Tensor | None]]


def per_sample_losses(loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor, n: int) -> torch.Tensor:
    """``loss_fn(outputs, targets)``, checked to be one loss per sample (shape ``(n,)``).

    Raises:
        ValueError: ``loss_fn`` reduced the batch (``reduction="mean"``) or returned another shape.
    """
    losses = loss_fn(outputs, targets)
    if not isinstance(losses, torch.Tensor) or losses.shape != (n,):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(
            f"loss_fn must return per-sample losses of shape ({n},) (use reduction='none'), got {shape}"
        )
    return losses


class StepEngine:
    """How one engine runs the passes of a SAM step; subclasses override what differs.

    The defaults are those of a plain (single-process) module.

    Attributes:
        module: the user's module (RW-SAM's estimators and BatchNorm freezing look at it).
    """

    def __init__(self, model: nn.Module, module: nn.Module | None = None) -> None:
        self.model = model
        self.module = module if module is not None else model

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
    """Context of a base step: LookSAM's view of ``engine`` (its gradients' layout, ``||g||``)."""
    if isinstance(optimizer, LookSAM):
        return optimizer.stepping_with(engine, grad_norm)
    return contextlib.nullcontext()


def sam_passes(
    engine: StepEngine,
    optimizer: SAM,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    num_groups: int,
    *,
    sync_ascent: bool = False,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
    fixed_grads: list[torch.Tensor] | None = None,
    freeze_bn: bool = True,
    context: dict[str, Any] | None = None,
    group_offset: int = 0,
) -> torch.Tensor:
    """Ascent and descent over ``num_groups`` groups of the batch (SPEC.md §2).

    Each group ``j`` takes its own ascent gradient ``g_j`` at ``w`` (device-local unless
    ``sync_ascent``), is perturbed to ``w + e(g_j)``, and adds ``(1/c) ∇L_j(w + e_j)`` to the
    descent gradient; the engine synchronizes that gradient once, at the last group.

    Args:
        engine: the :class:`StepEngine` of the model.
        optimizer: the SAM-family object (its rule, RW-SAM's ascent loss, ``w``'s exact restore).
        loss_fn: per-sample loss.
        inputs: this rank's batch; ``targets``: its targets.
        num_groups: ``c``, the number of ascent groups the batch is cut into.
        sync_ascent: take the ascent gradient synchronized (``ascent="global"``).
        autocast: a zero-argument callable returning the autocast context.
        scale: the loss scaler's ``scale`` (fp16); ascent gradients are unscaled before the norm.
        fixed_grads: one ascent gradient shared by every group (n-SAM's dataset gradient); then
            the step's forward at ``w`` runs without a backward.
        freeze_bn: the descent forward leaves BatchNorm running statistics untouched.
        context: extra keyword context for ``optimizer.ascent_loss`` (RW-SAM's estimators).
        group_offset: index of the first group within the optimizer step (RW-SAM's seeds when a
            step spans several calls, as DeepSpeed's accumulation does).

    Returns:
        The mean per-sample loss at ``w`` over the batch (detached, float32).
    """
    inv_scale = None if scale is None else 1.0 / scale(torch.ones((), device=inputs.device))
    scale = scale or (lambda t: t)
    base_context = dict(model=engine.model, module=engine.module, loss_fn=loss_fn, autocast=autocast,
                        step=optimizer.num_steps, **engine.loss_context(), **(context or {}))
    losses_at_w = []
    looking = isinstance(optimizer, LookSAM) and fixed_grads is None
    for j, (x, y) in enumerate(zip(inputs.chunk(num_groups), targets.chunk(num_groups))):
        last = j == num_groups - 1
        if j > 0:
            engine.restore(optimizer, last=False)  # back to w for this group's ascent
        if fixed_grads is None:
            params, g, losses = _ascent(engine, optimizer, loss_fn, x, y, sync_ascent, autocast, scale,
                                        dict(base_context, inputs=x, targets=y, group=group_offset + j))
            if inv_scale is not None:  # unscale before the norm (a fixed gradient is never scaled)
                engine.unscale_([t for t in g if t is not None], inv_scale)
        else:
            params, g = optimizer.params, fixed_grads
            with torch.no_grad(), engine.ascent_pass(False), autocast():  # the forward at w updates BN stats
                losses = per_sample_losses(loss_fn, engine.forward(x, ascent=True, last=last), y, x.shape[0])
        losses_at_w.append(losses.detach())
        if looking:  # LookSAM's plain gradient at w, before perturb overwrites the ascent buffers
            optimizer.observe_ascent(g, num_groups)
        norm = engine.norm([t for t in g if t is not None])
        poison = torch.where(torch.isfinite(norm), 1.0, float("nan"))
        engine.perturb(optimizer, params, g, norm, first=j == 0, owned=fixed_grads is None)
        params = g = None  # e is applied (or held by the engine): the ascent gradient's memory goes now
        try:
            with engine.descent_pass(last), frozen_running_stats(engine.module, freeze_bn):
                with autocast():
                    out = engine.forward(x, ascent=False, last=last)
                    descent = per_sample_losses(loss_fn, out, y, x.shape[0]).mean() / num_groups
                # poison in the loss's dtype: a 0-dim float32 would promote an fp16 loss (and
                # change how an engine's loss scaler overflows it; rho = 0 must be the plain step)
                engine.backward(scale(descent * poison.to(descent.device, descent.dtype)), last=last)
        except BaseException:
            engine.restore(optimizer, last=True)
            raise
    engine.restore(optimizer, last=True)
    if looking:
        optimizer.ascent_finished(engine)  # LookSAM's one extra all-reduce, on look steps only
    return torch.cat(losses_at_w).float().mean()


def _ascent(engine, optimizer, loss_fn, x, y, sync, autocast, scale, context):
    """This group's ascent gradient at ``w`` (kept out of ``.grad``) and its per-sample losses."""
    with engine.ascent_pass(sync), optimizer.ascent_context(engine.module):
        with autocast():
            outputs = engine.forward(x, ascent=True, last=False)
            losses = per_sample_losses(loss_fn, outputs, y, x.shape[0])
            objective = optimizer.ascent_loss(losses, outputs=outputs, **context)
        params, grads = engine.ascent_gradients(scale(objective), optimizer)
    return params, grads, losses


def plain_passes(engine: StepEngine, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor, k: int, *,
                 autocast=contextlib.nullcontext, scale=None) -> torch.Tensor:
    """A base-optimizer step's passes: ``k`` chunks, the gradient synced at the last one."""
    scale = scale or (lambda t: t)
    losses = []
    for j, (x, y) in enumerate(zip(inputs.chunk(k), targets.chunk(k))):
        last = j == k - 1
        with engine.descent_pass(last):
            with autocast():
                chunk = per_sample_losses(loss_fn, engine.forward(x, ascent=False, last=last), y, x.shape[0])
            engine.backward(scale(chunk.mean() / k), last=last)
        losses.append(chunk.detach())
    return torch.cat(losses).float().mean()
