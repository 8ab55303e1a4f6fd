"""Hugging Face dict batches in the step core's ``(inputs, targets)`` convention.

The core (:func:`dist_sam.core.sam_passes`) cuts ``inputs`` into groups with ``inputs.chunk(c)``,
reads ``inputs.shape[0]`` and calls the (wrapped) model with ``inputs`` as its one positional
argument, as every engine and RW-SAM's estimators (``functional_call(module, p, (x,))``) do. A
:class:`Batch` is a dict of tensors that answers the first two as one batch; a forward pre-hook on
the Hugging Face model (:func:`accept_batches`) turns ``model(batch)`` into ``model(**batch)``
below every DDP, FSDP2 or DeepSpeed wrapper, so nothing in the core or the engines changes.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["Batch", "accept_batches"]

_HOOKED = "_dist_sam_accepts_batches"


class Batch:
    """The model inputs of one batch, a mapping of names to values, cut along dim 0 together.

    Tensors whose first dimension is the batch size are chunked and sliced; anything else (a flag,
    a scalar) goes to every part unchanged. It is a pytree node, so FSDP2's input casting and
    DDP's device moves reach the tensors inside.
    """

    __slots__ = ("data",)

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data = dict(data)

    @property
    def size(self) -> int:
        """The batch size: the dim 0 that the tensors of this batch share."""
        sizes = {v.shape[0] for v in self.data.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
        if len(sizes) != 1:
            raise ValueError(f"a batch needs tensors sharing one batch size along dim 0, got sizes {sorted(sizes)} "
                             f"for keys {sorted(self.data)}")
        return sizes.pop()

    @property
    def shape(self) -> tuple[int]:
        return (self.size,)

    @property
    def device(self) -> torch.device:
        return next(v.device for v in self.data.values() if isinstance(v, torch.Tensor))

    def _map(self, fn: Callable[[torch.Tensor], Any]) -> "Batch":
        b = self.size
        return Batch({k: fn(v) if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == b else v
                      for k, v in self.data.items()})

    def __getitem__(self, index: slice) -> "Batch":
        if not isinstance(index, slice):
            raise TypeError(f"a Batch is indexed by a slice of samples, got {type(index).__name__}")
        return self._map(lambda v: v[index])

    def chunk(self, n: int) -> list["Batch"]:
        """Consecutive chunks, cut as ``torch.chunk`` cuts a tensor of this batch size."""
        bounds = [0]
        for c in torch.arange(self.size).chunk(n):
            bounds.append(bounds[-1] + len(c))
        return [self[slice(a, b)] for a, b in zip(bounds, bounds[1:])]


pytree.register_pytree_node(
    Batch,
    lambda b: (list(b.data.values()), list(b.data)),
    lambda values, keys: Batch(dict(zip(keys, values))),
)


def _unpack(module: nn.Module, args: tuple, kwargs: dict):
    if len(args) == 1 and not kwargs and isinstance(args[0], Batch):
        return (), dict(args[0].data)
    return None


def accept_batches(model: nn.Module) -> nn.Module:
    """Make ``model(batch)`` call ``model(**batch.data)`` for a :class:`Batch` (once per model).

    The hook runs before any other forward pre-hook registered so far; other calls pass through.
    """
    if not getattr(model, _HOOKED, False):
        model.register_forward_pre_hook(_unpack, with_kwargs=True, prepend=True)
        setattr(model, _HOOKED, True)
    return model
