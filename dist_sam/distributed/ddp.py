"""What "device-local" means under ``DistributedDataParallel``, and a gradient all-reduce counter.

The SAM algorithm never imports ``torch.distributed``; the step core's DDP engine
(:class:`dist_sam.distributed.engines.DDPEngine`) asks this module for the context in which a pass
must not synchronize gradients.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

__all__ = ["unwrap", "is_ddp", "check_model", "no_grad_sync", "CommCounter"]


def is_ddp(model: nn.Module) -> bool:
    return isinstance(model, DDP)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, DDP) else model


def check_model(model: nn.Module) -> None:
    """Refuse DDP configurations under which a local ascent pass is wrong.

    Raises:
        ValueError: ``static_graph=True``. DDP asserts when the first iteration runs under
            ``no_sync()``, and gradients taken otherwise are silently wrong under a static graph.
    """
    if isinstance(model, DDP) and model.static_graph:
        raise ValueError(
            "DistributedDataParallel(static_graph=True) is not supported by sam_step: its reducer "
            "assumes every backward is synchronized, which the device-local ascent pass is not; "
            "wrap the model with static_graph=False (the default)"
        )


def no_grad_sync(model: nn.Module, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Context in which forward *and* backward accumulate gradients locally, without all-reduce.

    Wrap both: a DDP forward outside ``no_sync()`` already prepares the reducer for a
    synchronized backward.
    """
    if enabled and isinstance(model, DDP):
        return model.no_sync()
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
        if not isinstance(model, DDP):
            raise ValueError(f"CommCounter.attach needs a DistributedDataParallel model, got {type(model).__name__}")
        counter = cls()
        model.register_comm_hook(counter, _counting_allreduce_hook)
        return counter

    def reset(self) -> None:
        self.calls, self.bytes = 0, 0


def _counting_allreduce_hook(counter, bucket):
    # No annotations: DDP inspects them, and this module's postponed (string) annotations
    # would not compare equal to dist.GradBucket.
    buffer = bucket.buffer()
    counter.calls += 1
    counter.bytes += buffer.numel() * buffer.element_size()
    return default_hooks.allreduce_hook(None, bucket)
