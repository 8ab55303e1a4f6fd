"""BatchNorm running statistics are updated once per step, by the ascent forward only.

The descent forward at ``w + e`` (and any extra forward: RW-SAM's estimator, n-SAM's full
gradient) still normalizes with batch statistics, but must leave ``running_mean``,
``running_var`` and ``num_batches_tracked`` as the ascent pass left them (SPEC.md §2).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

__all__ = ["frozen_running_stats"]


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Forwards inside this context do not touch BatchNorm running statistics.

    In training mode, a BatchNorm layer with ``track_running_stats=False`` normalizes with batch
    statistics and neither reads nor writes its buffers, so switching the flag off for the
    duration of a forward is exact: no buffer is copied, nothing is written. Works for every
    ``nn.modules.batchnorm._BatchNorm`` subclass, ``SyncBatchNorm`` included. Layers in eval mode
    are left alone (they never update their statistics).

    Args:
        model: the model, plain or wrapped (DDP, DeepSpeed engine module).
        enabled: ``False`` makes this a no-op.
    """
    layers = []
    if enabled:
        layers = [
            m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
        ]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True
