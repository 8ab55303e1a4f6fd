"""What "device-local" means under ``DistributedDataParallel``, and a gradient all-reduce counter.

The SAM algorithm never imports ``torch.distributed``; the step core's DDP engine
(:class:`dist_sam.distributed.engines.DDPEngine`) asks this module for the context in which a pass
must not synchronize gradients.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from ..core import WrappedModel
from . import collectives
from .wrapped import resolve

__all__ = ["unwrap", "local_module", "ddp_of", "is_ddp", "check_model", "check_wrapped", "no_grad_sync", "CommCounter"]


def ddp_of(model: nn.Module) -> DDP | None:
    """The DDP wrapper of ``model`` (also inside ``torch.compile(DDP(...))``), or ``None``."""
    return resolve(model).ddp


def is_ddp(model: nn.Module) -> bool:
    """True for a DDP model, compiled or not."""
    return ddp_of(model) is not None


def unwrap(model: nn.Module) -> nn.Module:
    """The user's eager module inside every DDP and ``torch.compile`` wrapper (or the model itself)."""
    return resolve(model).eager


def local_module(model: nn.Module) -> nn.Module:
    """What to run a forward on without any communication, compiled if the user compiled it
    (:mod:`dist_sam.distributed.wrapped`)."""
    return resolve(model).module


def check_model(model: nn.Module) -> None:
    """:func:`check_wrapped` of ``model``."""
    check_wrapped(resolve(model))


def check_wrapped(wrapped: WrappedModel) -> None:
    """Refuse DDP configurations under which a local ascent pass is wrong.

    Raises:
        ValueError: ``static_graph=True``. DDP asserts when the first iteration runs under
            ``no_sync()``, and gradients taken otherwise are silently wrong under a static graph.
    """
    ddp, model = wrapped.ddp, wrapped.model
    if ddp is not None and model is not ddp and not getattr(model, "_dist_sam_warned", False):  # compile(DDP(m))
        model._dist_sam_warned = True
        warnings.warn(
            "torch.compile(DDP(model)) is exact with sam_step but compiles nothing here: dynamo skips DDP's "
            "forward (torch 2.14.1 captured no graph); wrap the other way round, DDP(torch.compile(model))",
            stacklevel=3)
    if ddp is not None and ddp.static_graph:
        raise ValueError(
            "DistributedDataParallel(static_graph=True) is not supported by sam_step: its reducer "
            "assumes every backward is synchronized, which the device-local ascent pass is not; "
            "wrap the model with static_graph=False (the default)"
        )


def no_grad_sync(model: nn.Module | WrappedModel, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Context in which forward *and* backward accumulate gradients locally, without all-reduce.

    Wrap both: a DDP forward outside ``no_sync()`` already prepares the reducer for a
    synchronized backward. ``torch.compile(DDP(m))`` is seen through: its DDP's ``no_sync()``.
    """
    ddp = (model if isinstance(model, WrappedModel) else resolve(model)).ddp if enabled else None
    if ddp is not None:
        return ddp.no_sync()
    return contextlib.nullcontext()


@dataclasses.dataclass
class CommCounter:
    """Counts the gradient all-reduces a DDP model makes, and their bytes.

    It is a DDP communication hook that wraps the default all-reduce, so it sees exactly the
    buckets DDP sends::

        counter = CommCounter.attach(ddp_model)
        ...one step...
        print(counter.calls, counter.bytes); counter.reset()

    A DDP model takes one comm hook, registered before its first backward.
    """

    calls: int = 0
    bytes: int = 0

    @classmethod
    def attach(cls, model: DDP) -> "CommCounter":
        ddp = ddp_of(model)
        if ddp is None:
            raise ValueError(f"CommCounter.attach needs a DistributedDataParallel model, got {type(model).__name__}")
        counter = cls()
        ddp.register_comm_hook(counter, _counting_allreduce_hook)
        counter._group = ddp.process_group
        collectives.observe_all_reduces(counter._observe)  # reductions made beside DDP (batched m-SAM)
        return counter

    def reset(self) -> None:
        self.calls, self.bytes = 0, 0

    def _observe(self, group, flat: torch.Tensor) -> None:
        if group is self._group:
            self.calls += 1
            self.bytes += flat.numel() * flat.element_size()


def _counting_allreduce_hook(counter, bucket):
    # No annotations: DDP inspects them, and this module's postponed (string) annotations
    # would not compare equal to dist.GradBucket.
    buffer = bucket.buffer()
    counter.calls += 1
    counter.bytes += buffer.numel() * buffer.element_size()
    return default_hooks.allreduce_hook(None, bucket)
