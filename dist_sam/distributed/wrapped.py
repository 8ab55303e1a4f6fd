"""Resolve a model once: the user's module, its data-parallel wrapper, and whether it is compiled.

Every engine starts here (:func:`resolve` gives the :class:`~dist_sam.core.WrappedModel` it is
built on), so no layer below an engine unwraps anything. The orders ``sam_step`` accepts
(:mod:`dist_sam.compiled`):

=========================  ==================  ====================  ==========
model                      ``module``          ``eager``             compiled
=========================  ==================  ====================  ==========
``m``                      ``m``               ``m``                 no
``torch.compile(m)``       the compiled ``m``  ``m``                 yes
``DDP(m)``                 ``m``               ``m``                 no
``DDP(torch.compile(m))``  the compiled ``m``  ``m``                 yes
``torch.compile(DDP(m))``  ``m``               ``m``                 yes
``fully_shard(m)``         ``m``               ``m``                 no
=========================  ==================  ====================  ==========
"""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..compiled import is_compiled, strip_compiled
from ..core import WrappedModel

__all__ = ["WrappedModel", "resolve", "is_fsdp"]


def resolve(model: nn.Module) -> WrappedModel:
    """The :class:`~dist_sam.core.WrappedModel` of ``model`` (table above).

    Raises:
        ValueError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module (plain, DDP-wrapped, compiled or FSDP2-sharded), "
                         f"got {type(model).__name__}")
    outer = strip_compiled(model)
    ddp = outer if isinstance(outer, DDP) else None
    module = model if ddp is None else ddp.module  # compiled if the user compiled the module
    return WrappedModel(model, module, strip_compiled(module), compiled=is_compiled(model) or is_compiled(module),
                        ddp=ddp)


def is_fsdp(model: nn.Module) -> bool:
    """True if ``model`` or any submodule was sharded with ``torch.distributed.fsdp.fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())
