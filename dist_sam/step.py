"""``sam_step``: one SAM step of a plain, DDP-wrapped or FSDP2-sharded model, the one obvious path.

ascent (device-local by default) -> perturb -> descent (synchronized) -> restore -> base step. The
loop itself is :func:`dist_sam.core.sam_passes`; the model's engine (``dist_sam.distributed``:
DDP, FSDP2) supplies what "local", "perturb" and "synchronized" mean for it.

Ascent modes (SPEC.md §2), with ``n`` workers of per-worker batch ``b``:

============  ===========================================  ========  ===================
``ascent``    perturbation from                            ``m``     gradient all-reduces
============  ===========================================  ========  ===================
``local``     the worker's own batch, no communication     ``b``     1 (as SGD)
``micro``     each micro-batch of ``micro_batch_size``     ``m``     1
``global``    the all-reduced gradient of the global batch ``n*b``   2
``full``      the mean gradient over ``ascent_data``       ``N``     many (benchmarks)
============  ===========================================  ========  ===================

With ``accumulation_steps=k`` the batch is processed in ``k`` chunks of ``b/k`` samples, each with
its own ascent: ``m = b/k`` under ``local`` (m-SAM over the chunks), and one all-reduce per step.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any, Iterable

import torch
from torch import nn

from .bn import frozen_running_stats
from .core import LossFn, penalty_passes, per_sample_losses, plain_passes, sam_passes
from .distributed import collectives
from .distributed.engines import DDPEngine, engine_for
from .optim.batched import MICRO_IMPLS, batched_micro_grads, check_batchable
from .optim.first_order import FirstOrderMSAM
from .optim.first_order_vmap import batched_penalty_grads
from .optim.looksam import LookSAM
from .optim.sam import SAM

__all__ = ["sam_step", "base_step", "ASCENT_MODES", "full_gradient", "per_sample_losses"]

ASCENT_MODES = ("local", "micro", "global", "full")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _validate(optimizer, inputs, targets, ascent, micro_batch_size, accumulation_steps, clip_grad_norm, ascent_data) -> int:
    """Check every argument before any forward runs; return the number of ascent groups."""
    if not isinstance(optimizer, SAM):
        raise ValueError(f"optimizer must be a dist_sam.SAM (or subclass), got {type(optimizer).__name__}")
    if ascent not in ASCENT_MODES:
        raise ValueError(f"ascent must be one of {ASCENT_MODES}, got {ascent!r}")
    b = inputs.shape[0]
    if targets.shape[0] != b:
        raise ValueError(f"targets has {targets.shape[0]} samples but inputs has {b}")
    k = _positive_int("accumulation_steps", accumulation_steps)
    if b % k:
        raise ValueError(f"accumulation_steps={k} does not divide the batch size {b}")
    if clip_grad_norm is not None and not clip_grad_norm > 0:
        raise ValueError(f"clip_grad_norm must be > 0 or None, got {clip_grad_norm!r}")
    if ascent == "full" and ascent_data is None:
        raise ValueError("ascent='full' needs ascent_data (an iterable of (inputs, targets) batches)")
    if ascent == "full" and type(optimizer).ascent_loss is not SAM.ascent_loss:
        warnings.warn(f"{type(optimizer).__name__} reweights the ascent loss, which ascent='full' does not use",
                      stacklevel=3)
    if ascent != "micro":
        if micro_batch_size is not None:
            warnings.warn(f"micro_batch_size={micro_batch_size} is ignored with ascent={ascent!r}", stacklevel=3)
        return k
    m = _positive_int("micro_batch_size", micro_batch_size)
    if (b // k) % m:
        raise ValueError(
            f"micro_batch_size={m} does not divide the per-worker batch {b // k} "
            f"(batch {b}, accumulation_steps {k}); pick a divisor of it"
        )
    return b // m


def full_gradient(module: nn.Module, loss_fn: LossFn, data: Iterable, params: list[torch.Tensor],
                  autocast=contextlib.nullcontext) -> list[torch.Tensor]:
    """Mean gradient of the per-sample loss over every sample of ``data``, across all ranks (n-SAM).

    Runs on ``module``, a forward without communication (the engine's ``module``), with BatchNorm
    running statistics frozen; one all-reduce of the summed gradients and the sample count at the end.
    """
    wide = torch.float64 if params[0].dtype == torch.float64 else torch.float32
    total = [torch.zeros_like(p, dtype=wide) for p in params]
    count = torch.zeros((), dtype=wide, device=params[0].device)
    with frozen_running_stats(module):
        for x, y in data:
            with autocast():
                losses = per_sample_losses(loss_fn, module(x), y, x.shape[0])
            grads = torch.autograd.grad(losses.sum(), params, allow_unused=True)
            with torch.no_grad():
                torch._foreach_add_(total, [torch.zeros_like(t) if g is None else g.to(wide) for t, g in zip(total, grads)])
                count += x.shape[0]
    collectives.all_reduce_sum_(total + [count])
    return [(t / count).to(p.dtype) for t, p in zip(total, params)]


def sam_step(
    model: nn.Module,
    optimizer: SAM,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    ascent: str = "local",
    micro_batch_size: int | None = None,
    clip_grad_norm: float | None = None,
    scaler: torch.amp.GradScaler | None = None,
    accumulation_steps: int = 1,
    ascent_data: Iterable | None = None,
    autocast_dtype: torch.dtype | None = None,
    freeze_bn: bool = True,
    fsdp_memory: str | None = None,
    micro_impl: str = "loop",
) -> torch.Tensor:
    """Run one full SAM step and return the mean loss at ``w`` (detached, no host sync).

    Args:
        model: the model: plain, ``DistributedDataParallel``-wrapped, or sharded with FSDP2's
            ``fully_shard`` (root and nested units; the optimizer on ``model.parameters()``).
        optimizer: a :class:`dist_sam.SAM` (any variant, RW-SAM included).
        loss_fn: ``loss_fn(outputs, targets)`` returning **per-sample** losses of shape ``(b,)``,
            e.g. ``nn.CrossEntropyLoss(reduction="none")``; RW-SAM weights them.
        inputs: this worker's batch, ``b`` samples along dim 0.
        targets: its targets.
        ascent: ``local`` | ``micro`` | ``global`` | ``full`` (module docstring).
        micro_batch_size: ``m`` for ``ascent="micro"``; must divide ``b / accumulation_steps``.
        clip_grad_norm: clip the averaged descent gradient (after the all-reduce) to this norm.
        scaler: a ``torch.amp.GradScaler`` for fp16. A non-finite gradient in either pass skips
            the step on every rank together; the scaler updates once per step.
        accumulation_steps: process the batch in this many chunks, each with its own ascent.
        ascent_data: the dataset/loader whose mean gradient perturbs in ``full`` mode.
        autocast_dtype: run the forwards under ``torch.autocast`` with this dtype (e.g. bf16).
        freeze_bn: keep BatchNorm running statistics as the ascent forward left them.
        fsdp_memory: FSDP2 models only: ``"resident"`` (default: the perturbed unsharded copies
            stay resident from ascent to descent; one all-gather per step) or ``"lean"`` (the
            ascent gradient is stashed and added after each unit's all-gather: one all-gather
            more, about one full-size buffer less); see :mod:`dist_sam.distributed.fsdp`.
        micro_impl: ``loop`` (one micro-batch after another) or ``vmap`` (every micro-batch's
            ascent and descent as one ``torch.func`` computation, :mod:`dist_sam.optim.batched`:
            the same step, ``b/m`` stacked copies of the weights); ``ascent="micro"`` only, plain
            or DDP models. With a :class:`~dist_sam.optim.first_order.FirstOrderMSAM` (``"msam-fo"``)
            the same choice takes its group gradients one by one or all at once.

    Returns:
        The mean per-sample loss at the unperturbed weights ``w``.
    """
    num_groups = _validate(optimizer, inputs, targets, ascent, micro_batch_size, accumulation_steps, clip_grad_norm, ascent_data)
    engine = engine_for(model, scaler=scaler, ascent=ascent, **({} if fsdp_memory is None else {"fsdp_memory": fsdp_memory}))
    engine.check(optimizer)
    _check_looksam(optimizer, ascent, micro_impl)
    _check_first_order(optimizer, ascent, engine, scaler, micro_impl)
    _check_micro_impl(micro_impl, ascent, engine, optimizer, scaler, freeze_bn)
    if not optimizer.should_perturb():
        return base_step(model, optimizer, loss_fn, inputs, targets, clip_grad_norm=clip_grad_norm, scaler=scaler,
                         accumulation_steps=accumulation_steps, autocast_dtype=autocast_dtype)
    autocast = _autocast(inputs, autocast_dtype)
    optimizer.zero_grad(set_to_none=True)
    if isinstance(optimizer, FirstOrderMSAM):  # w never perturbed: L + (rho/c) sum_j ||g_j||, differentiated
        rho = optimizer.penalty_rho()
        if micro_impl == "vmap":
            grads_fn = functools.partial(batched_penalty_grads, rho=rho)
            loss = _vmap_micro(engine, optimizer, loss_fn, inputs, targets, micro_batch_size, autocast, grads_fn)
        else:
            loss = penalty_passes(engine, optimizer.params, loss_fn, inputs, targets, num_groups, rho, autocast=autocast)
        engine.finish(optimizer, clip_grad_norm, scaler)
        return loss
    if micro_impl == "vmap":
        loss = _vmap_micro(engine, optimizer, loss_fn, inputs, targets, micro_batch_size, autocast)
        engine.finish(optimizer, clip_grad_norm, scaler)
        return loss
    fixed = full_gradient(engine.module, loss_fn, ascent_data, optimizer.params, autocast) if ascent == "full" else None
    loss = sam_passes(engine, optimizer, loss_fn, inputs, targets, num_groups, sync_ascent=ascent == "global",
                      autocast=autocast, scale=scaler.scale if scaler is not None else None, fixed_grads=fixed,
                      freeze_bn=freeze_bn, context=dict(rank=collectives.rank()))
    engine.finish(optimizer, clip_grad_norm, scaler)
    return loss


def _check_looksam(optimizer, ascent, micro_impl) -> None:
    """LookSAM's look steps take the plain gradient at ``w`` from a device-local ascent."""
    if not isinstance(optimizer, LookSAM):
        return
    if ascent not in ("local", "micro"):
        raise ValueError(f"LookSAM runs with ascent='local' or 'micro' (look-m-SAM), got ascent={ascent!r}")
    if micro_impl != "loop":
        raise ValueError(f"LookSAM runs with micro_impl='loop', got micro_impl={micro_impl!r}")


def _check_first_order(optimizer, ascent, engine, scaler, micro_impl) -> None:
    """First-order m-SAM: device-local groups, double backward on a plain or DDP model, no fp16 scaler."""
    if not isinstance(optimizer, FirstOrderMSAM):
        return
    if ascent not in ("local", "micro"):
        raise ValueError(f"FirstOrderMSAM runs with ascent='local' or 'micro' (its groups are device-local), "
                         f"got ascent={ascent!r}")
    if not isinstance(engine, DDPEngine):
        raise ValueError("FirstOrderMSAM runs on plain and DDP models (double backward); an FSDP2 model is not supported")
    if scaler is not None:
        raise ValueError("FirstOrderMSAM does not take a GradScaler (fp16); use bf16 autocast or fp32")
    if engine.compiled and micro_impl == "loop":  # aot_autograd: "does not currently support double backward"
        raise ValueError("FirstOrderMSAM with micro_impl='loop' cannot run a torch.compile'd model (no double "
                         "backward through compiled graphs, torch 2.14.1); use micro_impl='vmap' (eager) or the eager model")
    optimizer.penalty_rho()  # one rho > 0 over the param groups, or a ValueError naming them


def _check_micro_impl(micro_impl, ascent, engine, optimizer, scaler, freeze_bn) -> None:
    if micro_impl not in MICRO_IMPLS:
        raise ValueError(f"micro_impl must be one of {MICRO_IMPLS}, got {micro_impl!r}")
    if micro_impl == "loop":
        return
    if ascent != "micro":
        raise ValueError(f"micro_impl='vmap' batches the micro-batches of ascent='micro', got ascent={ascent!r}")
    if not isinstance(engine, DDPEngine):
        raise ValueError("micro_impl='vmap' runs on plain and DDP models; an FSDP2 model needs micro_impl='loop'")
    check_batchable(engine.eager, optimizer, scaler=scaler, freeze_bn=freeze_bn)
    if engine.compiled:
        warnings.warn("micro_impl='vmap' runs the eager module: torch.func transforms over a compiled module are "
                      "not supported from eager code", stacklevel=3)


def _vmap_micro(engine, optimizer, loss_fn, inputs, targets, m, autocast, grads_fn=batched_micro_grads) -> torch.Tensor:
    """Batched m-SAM (:mod:`dist_sam.optim.batched`). Under DDP: first rank 0's buffers, as the loop's
    first forward takes them (DDP broadcasts after a synchronized forward), then one all-reduce of
    the gradients; the ranks' BatchNorm statistics then differ as the loop leaves them."""
    ddp = engine.wrapped.ddp
    if ddp is not None and ddp.broadcast_buffers:
        collectives.broadcast_(list(engine.eager.buffers()))
    grads, losses = grads_fn(engine.eager, optimizer, loss_fn, inputs, targets, m, autocast=autocast)
    if ddp is not None:  # one reduction per step over DDP's own group, as DDP makes it
        collectives.all_reduce_mean_(grads, group=ddp.process_group)
    for p, g in zip(optimizer.params, grads):
        p.grad = g
    return losses.float().mean()


def base_step(
    model: nn.Module,
    optimizer: SAM,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    clip_grad_norm: float | None = None,
    scaler: torch.amp.GradScaler | None = None,
    accumulation_steps: int = 1,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """A plain base-optimizer step (one forward and backward, one all-reduce), no perturbation.

    What ``sam_step`` runs on the steps ``interval`` leaves plain, and what a trainer runs for an
    SGD baseline, with the same clipping, scaler and non-finite handling. Arguments as
    :func:`sam_step`; returns the mean loss.
    """
    _validate(optimizer, inputs, targets, "local", None, accumulation_steps, clip_grad_norm, None)
    engine = engine_for(model, scaler=scaler)
    optimizer.zero_grad(set_to_none=True)
    loss = plain_passes(engine, loss_fn, inputs, targets, accumulation_steps, autocast=_autocast(inputs, autocast_dtype),
                        scale=scaler.scale if scaler is not None else None)
    engine.finish(optimizer, clip_grad_norm, scaler)
    return loss


def _autocast(inputs: torch.Tensor, dtype: torch.dtype | None):
    device_type = inputs.device.type
    return (lambda: torch.autocast(device_type, dtype=dtype)) if dtype else contextlib.nullcontext
