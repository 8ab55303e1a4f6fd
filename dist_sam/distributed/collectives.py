"""Collectives that are no-ops in a single process and fail loudly when a group is missing."""

from __future__ import annotations

import weakref
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from .env import discover

__all__ = ["world_size", "rank", "is_primary", "all_reduce_mean_", "all_reduce_sum_", "broadcast_", "barrier",
           "all_gather_objects", "observe_all_reduces"]

_observers: list[weakref.WeakMethod] = []  # bound methods called as (group, flat tensor) before each all-reduce


def observe_all_reduces(method: Callable[[object, torch.Tensor], None]) -> None:
    """Call ``method(group, flat)`` before each all-reduce made here (``group`` ``None``: the
    default group); a bound method, held weakly (:class:`~dist_sam.distributed.ddp.CommCounter`)."""
    _observers[:] = [w for w in _observers if w() is not None]
    _observers.append(weakref.WeakMethod(method))


def _all_reduce(flat: torch.Tensor, group) -> None:
    for ref in list(_observers):
        method = ref()
        if method is not None:
            method(group, flat)
    dist.all_reduce(flat, group=group)


def _initialized() -> bool:
    if dist.is_available() and dist.is_initialized():
        return True
    if discover().world_size > 1:
        raise RuntimeError(
            "the launcher started several processes but torch.distributed is not initialized; "
            "initialize it first (torch.distributed.init_process_group, or launch/train.py does it)"
        )
    return False


def world_size() -> int:
    """Number of processes in the default group (1 without one)."""
    return dist.get_world_size() if _initialized() else 1


def rank() -> int:
    """Global rank (0 without a group)."""
    return dist.get_rank() if _initialized() else 0


def is_primary() -> bool:
    """True on rank 0: the process that logs and saves."""
    return rank() == 0


def _flat_per_dtype(tensors: Sequence[torch.Tensor], collective) -> None:
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        collective(flat)
        for t, v in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(v.view_as(t))


def all_reduce_sum_(tensors: Sequence[torch.Tensor], group=None) -> None:
    """Sum ``tensors`` in place across the ranks of ``group`` (default: all): one collective per
    dtype, through a flat buffer. A given group is used even with one rank (as DDP does)."""
    if not tensors or (group is None and world_size() == 1):
        return
    _flat_per_dtype(tensors, lambda flat: _all_reduce(flat, group))


def broadcast_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """``src``'s values of ``tensors`` on every rank, in place: one broadcast per dtype."""
    if world_size() == 1 or not tensors:
        return
    _flat_per_dtype(tensors, lambda flat: dist.broadcast(flat, src=src))


def all_reduce_mean_(tensors: Sequence[torch.Tensor], group=None) -> None:
    """Average ``tensors`` in place across the ranks of ``group`` (default: all; one collective call)."""
    if not tensors or (group is None and world_size() == 1):
        return
    all_reduce_sum_(tensors, group)
    n = world_size() if group is None else dist.get_world_size(group)
    if n > 1:
        torch._foreach_div_(list(tensors), float(n))


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if world_size() > 1:
        dist.barrier()


def all_gather_objects(obj: object) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` in a single process)."""
    if not _initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
