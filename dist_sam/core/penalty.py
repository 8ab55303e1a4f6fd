"""First-order m-SAM's passes (``"msam-fo"``, :mod:`dist_sam.optim.first_order`), group by group.

For each group ``j`` of the batch: one forward at ``w``, ``g_j = ∇L_j(w)`` by
``autograd.grad(create_graph=True)``, then one backward of ``(L_j + rho <g_j, u_j>) / c`` with
``u_j = stop_grad(g_j / (||g_j|| + eps_norm))``: its gradient is
``(g_j + rho H_j g_j / (||g_j|| + eps_norm)) / c``, the exact gradient of ``(L_j + rho ||g_j||) / c``
(with SPEC.md's ``eps_norm`` floor, so ``g_j = 0`` gives a finite step). The backward accumulates
into ``.grad`` through the engine, which synchronizes at the last group: one gradient reduction per
step under DDP, as m-SAM's. ``w`` is never perturbed. This module never imports ``torch.distributed``.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from ..optim.rules import EPS_NORM
from .engine import StepEngine
from .loop import LossFn, per_sample_losses

__all__ = ["penalty_passes", "penalty_term"]


def penalty_term(grads: list[torch.Tensor | None]) -> torch.Tensor:
    """``<g, stop_grad(g / (||g|| + eps_norm))>`` over every tensor: ``||g||`` in value (to eps),
    ``H g / (||g|| + eps_norm)`` in gradient; float32 or wider."""
    live = [g for g in grads if g is not None]
    if not live:
        return torch.zeros(())
    wide = torch.float64 if any(g.dtype == torch.float64 for g in live) else torch.float32
    norm = torch.sqrt(sum((g.detach().to(wide) ** 2).sum() for g in live))
    inv = 1.0 / (norm + EPS_NORM)
    return sum((g.to(wide) * (g.detach().to(wide) * inv)).sum() for g in live)


def penalty_passes(
    engine: StepEngine,
    params: list[torch.Tensor],
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    num_groups: int,
    rho: float,
    *,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """``.grad <- (1/c) Σ_j [g_j + rho H_j g_j / (||g_j|| + eps_norm)]`` over ``c = num_groups`` groups.

    Args:
        engine: the model's :class:`StepEngine` (its forward, per-group sync and backward).
        params: the parameters to differentiate (the optimizer's :attr:`~dist_sam.SAM.params`).
        loss_fn: per-sample loss.
        inputs: this rank's batch; ``targets``: its targets.
        num_groups: ``c``; the batch is cut into ``c`` equal groups in batch order.
        rho: the penalty's weight, ``> 0``.
        autocast: a zero-argument callable returning the autocast context.

    Returns:
        The mean per-sample loss at ``w`` over the batch (detached, float32).
    """
    losses_at_w = []
    for j, (x, y) in enumerate(zip(inputs.chunk(num_groups), targets.chunk(num_groups))):
        last = j == num_groups - 1
        with engine.descent_pass(last):  # local but for the last group (the step's one reduction)
            with autocast():
                losses = per_sample_losses(loss_fn, engine.forward(x, ascent=True, last=last), y, x.shape[0])
            loss = losses.mean()
            g = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)  # g_j, differentiable
            objective = (loss + rho * penalty_term(list(g)).to(loss.dtype)) / num_groups
            engine.backward(objective, last=last)
        losses_at_w.append(losses.detach())
    return torch.cat(losses_at_w).float().mean()
