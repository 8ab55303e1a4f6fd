"""``torch.compile`` wrappers: what sits inside an ``OptimizedModule``, and the supported orders.

``torch.compile(module)`` returns a ``torch._dynamo.eval_frame.OptimizedModule`` that holds the
user's module as ``_orig_mod`` and shares its parameters and buffers. ``sam_step`` and
``base_step`` accept, for every variant and ascent mode:

* ``torch.compile(model)`` (one process);
* ``DDP(torch.compile(model))``: **the recommended order under DDP**. DDP's reducer, its hooks and
  ``no_sync()`` stay eager and exact, and the compiled module under it is what RW-SAM's extra
  ``fd`` forward runs through (``torch.func.functional_call``), so that forward is compiled too;
* ``torch.compile(DDP(model))``: exact (``no_sync()`` is found through the wrapper), but it
  compiles nothing: dynamo skips DDP's forward (``_inside_ddp_forward``) and, with torch 2.14.1 on
  CPU/gloo, captured no graph at all. ``sam_step`` warns once and runs it; wrap the other way.

RW-SAM ``exact`` and ``mu="auto"`` calibration take ``torch.func`` per-sample gradients; PyTorch
does not support ``torch.func.grad`` over a compiled function called from eager code (PyTorch
issue #128711), so those run on the eager module (:func:`strip_compiled`; ``exact`` warns once). RW-SAM
``last_layer`` captures the final layer's input with a forward hook, and dynamo does not guard on
hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``): on a compiled model the hook is
registered once and kept, and its first registration clears dynamo's code caches once
(``torch._dynamo.reset_code_caches``) so that no graph traced without it runs. Batched m-SAM
(``micro_impl="vmap"``) runs the eager module, with a warning. This module never imports
``torch.distributed``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["is_compiled", "strip_compiled", "LayerCapture"]


def is_compiled(model: nn.Module) -> bool:
    """True for the module ``torch.compile(module)`` returned (an ``OptimizedModule``)."""
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover - torch builds without dynamo
        return False
    return isinstance(model, OptimizedModule)


def strip_compiled(model: nn.Module) -> nn.Module:
    """The module inside any number of ``torch.compile`` wrappers (``_orig_mod``), or ``model``."""
    while is_compiled(model):
        model = model._orig_mod
    return model


class LayerCapture:
    """A forward hook that stays on one layer of a compiled model and keeps ``(input, output, layer)``
    of its latest forward (detached) in :attr:`value`.

    Dynamo traces the hook into the graph and replays its store into this plain object; it does
    not notice hooks added or removed later (``torch._dynamo.config.skip_nnmodule_hook_guards``),
    so the hook is registered once, and the first :meth:`attach` clears dynamo's code caches
    (``torch._dynamo.reset_code_caches``: every compiled function recompiles once) so that no
    graph traced without it runs.
    """

    def __init__(self) -> None:
        self.value: tuple | None = None
        self._layer: nn.Module | None = None
        self._handle = None

    def attach(self, layer: nn.Module) -> None:
        """Hook ``layer`` (once; moving to another layer unhooks the previous one)."""
        if self._layer is layer:
            return
        if self._handle is not None:
            self._handle.remove()
        self._layer, self._handle = layer, layer.register_forward_hook(self._hook)
        torch._dynamo.reset_code_caches()

    def _hook(self, mod, inputs, output) -> None:
        self.value = (inputs[0].detach(), output.detach(), mod)

    def take(self) -> tuple | None:
        """The latest capture, and forget it."""
        value, self.value = self.value, None
        return value
