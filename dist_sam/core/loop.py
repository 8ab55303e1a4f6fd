"""The SAM step loop: ascent -> perturb -> descent -> restore, once, for every engine.

:func:`sam_passes` runs the groups of one step through a :class:`~dist_sam.core.engine.StepEngine`;
:func:`plain_passes` a base-optimizer step's passes. A non-finite ascent gradient poisons the
descent loss (``loss * NaN``): the engine's gradient reduction then carries the NaN to every rank,
so every rank skips the step together, with no extra communication. This module never imports
``torch.distributed``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from ..bn import frozen_running_stats
from ..optim.sam import SAM
from .engine import StepEngine

__all__ = ["sam_passes", "plain_passes", "per_sample_losses", "LossFn"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
    base_context = dict(model=engine.model, module=engine.module, eager=engine.eager, loss_fn=loss_fn, autocast=autocast,
                        step=optimizer.num_steps, **engine.loss_context(), **(context or {}))
    losses_at_w = []
    looking = fixed_grads is None  # the optimizer sees each ascent gradient (LookSAM's plain gradient at w)
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
        if looking:  # before perturb overwrites the ascent buffers
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
    with engine.ascent_pass(sync), optimizer.ascent_context(engine.eager, capture=engine.capture):
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
