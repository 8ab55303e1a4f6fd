"""Batched m-SAM: every micro-batch's ascent and descent of a step as one ``torch.func`` computation.

``sam_step(..., ascent="micro", micro_impl="vmap")`` replaces the loop over the ``c = b/m``
micro-batches (SPEC.md §2: for each ``j``, ``g_j`` at ``w``, ``e_j = e(g_j)``, ``h_j`` at
``w + e_j``; the step's gradient is ``(1/c) Σ_j h_j``) by two vectorized passes::

    g = vmap(grad(f), in_dims=(None, 0))(w, x_j)          # all ascent gradients, stacked (c, ...)
    e = rule(g)                                           # per-micro-batch norms, one pass
    h = vmap(grad(f), in_dims=(0, 0))(w + e, x_j)         # all descent gradients
    grad = h.sum(0) / c

The module's parameters are never written (the perturbed weights are separate stacked tensors),
so there is no backup and no restore; the price is ``c`` stacked copies of the parameters and of
each gradient. BatchNorm in training mode is exact: each micro-batch normalizes with its own batch
statistics, as in the loop, and the running statistics receive the loop's ``c`` sequential
momentum updates, composed in closed form from the ``c`` batch statistics (the ascent forwards
write them into zero-initialized stacked copies; the descent forwards run with the statistics
frozen). Refused with a ``ValueError``: RW-SAM with ``lam > 0`` (its reweighted ascent runs an
estimator per micro-batch), active dropout (vmap cannot replay the loop's masks), BatchNorm with
``momentum=None`` and ``SyncBatchNorm``. A compiled module runs eagerly here (``torch.func``
transforms over a compiled function are not supported from eager code). Nothing here
communicates: under DDP the caller all-reduces the returned gradients.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ..bn import frozen_running_stats
from .rules import EPS_NORM
from .sam import SAM

__all__ = ["MICRO_IMPLS", "check_batchable", "batched_micro_grads"]

#: ``sam_step(micro_impl=...)``: the sequential loop (default) or this module's vmapped passes.
MICRO_IMPLS = ("loop", "vmap")


def _bn_layers(module: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]


def check_batchable(module: nn.Module, optimizer: SAM, *, scaler=None, freeze_bn: bool = True) -> None:
    """Raise ``ValueError`` (before any work) where the vmapped passes cannot equal the loop."""
    if getattr(optimizer, "lam", 0) != 0 and type(optimizer).ascent_loss is not SAM.ascent_loss:
        raise ValueError(f"micro_impl='vmap' supports SAM, USAM and ASAM ascents; {type(optimizer).__name__} with "
                         f"lam={optimizer.lam} reweights each micro-batch's ascent: use micro_impl='loop'")
    if type(optimizer).ascent_loss is not SAM.ascent_loss and not hasattr(optimizer, "lam"):
        raise ValueError(f"micro_impl='vmap' needs SAM's mean ascent loss; {type(optimizer).__name__} overrides "
                         "ascent_loss: use micro_impl='loop'")
    if scaler is not None:
        raise ValueError("micro_impl='vmap' does not take a GradScaler (fp16); use bf16 autocast or micro_impl='loop'")
    if not freeze_bn:
        raise ValueError("micro_impl='vmap' needs freeze_bn=True (the descent forwards leave BatchNorm statistics alone)")
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise ValueError(f"micro_impl='vmap' cannot reproduce the loop's dropout masks ({name or 'model'}: "
                             f"{type(m).__name__}(p={m.p}) in training mode); use micro_impl='loop'")
        if isinstance(m, nn.SyncBatchNorm) and m.training:
            raise ValueError(f"micro_impl='vmap' does not support SyncBatchNorm ({name}): use micro_impl='loop'")
    for name, m in _bn_layers(module):
        if m.momentum is None:
            raise ValueError(f"micro_impl='vmap' needs BatchNorm momentum as a number ({name} has momentum=None, "
                             "a cumulative average); use micro_impl='loop'")


def _named(module: nn.Module, optimizer: SAM) -> dict[str, torch.Tensor]:
    """``{name: p}`` for the optimizer's trainable parameters, in :attr:`SAM.params` order."""
    names = {id(p): n for n, p in module.named_parameters()}
    missing = [i for i, p in enumerate(optimizer.params) if id(p) not in names]
    if missing:
        raise ValueError(f"micro_impl='vmap': optimizer parameters {missing} are not parameters of the model")
    return {names[id(p)]: p.detach() for p in optimizer.params}


def _rule(optimizer: SAM, g: list[torch.Tensor], w: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``e_j`` for every micro-batch from stacked ``g`` (``(c, *p.shape)``), SPEC.md §1, and the norms."""
    groups = optimizer._group_of_params()
    rho = [grp["rho"] for grp in groups]
    if optimizer.defaults["adaptive"]:
        t = [p.abs().add(grp["eta"]) for p, grp in zip(w, groups)]  # T = |w| + eta
        scaled = [ti * gi for ti, gi in zip(t, g)]
        direction = [ti * si for ti, si in zip(t, scaled)]
    else:
        scaled = direction = g
    wide = torch.float64 if any(x.dtype == torch.float64 for x in g) else torch.float32
    norms = torch.stack([s.flatten(1).to(wide).pow(2).sum(1) for s in scaled]).sum(0).sqrt()  # (c,)
    if not optimizer.defaults["normalize"]:
        return [(r * d).to(p.dtype) for r, d, p in zip(rho, direction, w)], norms
    inv = 1.0 / (norms + EPS_NORM)
    return [(d.to(wide) * (r * inv).view(-1, *[1] * (d.dim() - 1))).to(p.dtype)
            for r, d, p in zip(rho, direction, w)], norms


def _compose_running_stats(layers, stats: dict[str, torch.Tensor], c: int) -> None:
    """The loop's ``c`` updates ``r <- (1 - mo) r + mo s_j`` in order, from ``mo s_j`` (stacked)."""
    with torch.no_grad():
        for name, m in layers:
            mo = float(m.momentum)
            weights = torch.tensor([(1.0 - mo) ** (c - 1 - j) for j in range(c)], dtype=torch.float64)
            for key in ("running_mean", "running_var"):
                buf = getattr(m, key)
                upd = stats[f"{name}.{key}" if name else key]
                total = (upd.double() * weights.to(upd.device).view(-1, *[1] * (upd.dim() - 1))).sum(0)
                buf.copy_((buf.double() * (1.0 - mo) ** c + total).to(buf.dtype))
            m.num_batches_tracked.add_(c)


@contextlib.contextmanager
def _bn_in_weight_dtype(module: nn.Module):
    """BatchNorm on the weights' dtype: under autocast a bf16/fp16 activation meets fp32 BN weights,
    which eager BN accepts but its vmap rule does not; cast in, compute, cast back (BN computes
    its statistics in fp32 either way)."""
    dtypes: dict[int, torch.dtype] = {}

    def pre(m, args):
        x = args[0]
        if m.weight is not None and x.dtype != m.weight.dtype:
            dtypes[id(m)] = x.dtype
            return (x.to(m.weight.dtype),) + tuple(args[1:])
        return None

    def post(m, args, out):
        dtype = dtypes.pop(id(m), None)
        return out if dtype is None else out.to(dtype)

    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    handles = [h for m in layers for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def batched_micro_grads(
    model: nn.Module,
    optimizer: SAM,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    micro_batch_size: int,
    *,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The m-SAM step's descent gradient ``(1/c) Σ_j h_j`` and the per-sample losses at ``w``.

    Args:
        model: the user's eager module (the engine's ``eager``: no DDP or ``torch.compile`` wrapper).
        optimizer: a SAM, USAM or ASAM (:func:`check_batchable`); only its rule and groups are used.
        loss_fn: per-sample losses, shape ``(m,)`` per micro-batch.
        inputs: the batch, ``b`` samples, ``b`` a multiple of ``micro_batch_size``.
        targets: its targets.
        micro_batch_size: ``m``.
        autocast: context factory entered around each forward.

    Returns:
        ``(grads, losses)``: one gradient per :attr:`SAM.params` entry (a ``NaN`` everywhere when an
        ascent norm is non-finite, so the caller's finite check skips the step), and the ``b``
        ascent losses ``f_i(w)``. BatchNorm running statistics end as the loop leaves them.
    """
    module = model
    named = _named(module, optimizer)
    c = inputs.shape[0] // micro_batch_size
    xs, ys = inputs.unflatten(0, (c, micro_batch_size)), targets.unflatten(0, (c, micro_batch_size))
    layers = _bn_layers(module)
    prefix = lambda n: f"{n}." if n else ""  # noqa: E731
    stats = {f"{prefix(n)}{k}": torch.zeros((c, *getattr(m, k).shape), dtype=getattr(m, k).dtype, device=getattr(m, k).device)
             for n, m in layers for k in ("running_mean", "running_var", "num_batches_tracked")}

    def ascent(p, bufs, x, y):
        with autocast():
            losses = loss_fn(functional_call(module, (p, bufs), (x,)), y)
        return losses.mean(), losses.detach()

    mixed = autocast is not contextlib.nullcontext
    with _bn_in_weight_dtype(module) if mixed else contextlib.nullcontext():
        g, losses = vmap(grad(ascent, has_aux=True), in_dims=(None, 0, 0, 0))(named, stats, xs, ys)
    _compose_running_stats(layers, stats, c)
    w = list(named.values())
    e, norms = _rule(optimizer, [g[n] for n in named], w)
    perturbed = {n: wi.unsqueeze(0) + ei for n, wi, ei in zip(named, w, e)}

    def descent(p, x, y):
        with autocast():
            return loss_fn(functional_call(module, p, (x,)), y).mean()

    with frozen_running_stats(module), _bn_in_weight_dtype(module) if mixed else contextlib.nullcontext():
        h = vmap(grad(descent), in_dims=(0, 0, 0))(perturbed, xs, ys)
    poison = torch.where(torch.isfinite(norms).all(), 1.0, float("nan"))
    grads = [(h[n].sum(0) / c * poison.to(h[n].device)).to(p.dtype) for n, p in zip(named, optimizer.params)]
    return grads, losses.flatten()
