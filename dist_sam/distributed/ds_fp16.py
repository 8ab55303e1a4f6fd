"""DeepSpeed fp16: SAM's extra passes under the engine's own loss scale (ZeRO 0, 1 and 2).

The ascent gradient is ``autograd.grad`` of the objective scaled exactly as ``engine.backward``
scales a loss, unscaled (in float32) before its norm. A non-finite scaled gradient poisons the
descent loss, so DeepSpeed's own overflow check skips the step on every rank and moves its own
loss scaler: the skipped-step count and scale sequence are DeepSpeed's.

The "suspected mis-scaling" was DeepSpeed's: in 0.19.8, ``engine.backward`` scales the loss only
for ZeRO optimizers (``ZeROOptimizer.scale_if_loss``); under ZeRO-0 the ``FP16_Optimizer`` /
``FP16_UnfusedOptimizer`` is no ZeRO optimizer, so the loss reaches ``.backward()`` unscaled while
its ``step()`` still divides by the loss scale (65536): every ZeRO-0 fp16 update, SAM's or plain
SGD's, is 65536 times too small (deepspeedai/DeepSpeed PR #8393, open). :func:`descent_loss`
scales the loss as ``FP16_Optimizer.backward`` would (what that PR routes to) on the DeepSpeed
versions known to lack the fix; others are refused by :func:`check_version`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["TESTED_VERSIONS", "check_version", "loss_scale", "scale_loss", "unscale", "descent_loss"]

TESTED_VERSIONS = ("0.19.8",)  # DeepSpeed versions whose internals zero3.py and this module rely on


def check_version(feature: str) -> None:
    """Refuse DeepSpeed versions other than :data:`TESTED_VERSIONS` for ``feature``.

    Raises:
        ValueError: naming the installed version, the feature and the accepted versions.
    """
    import deepspeed

    version = deepspeed.__version__.split("+")[0]
    if version not in TESTED_VERSIONS:
        raise ValueError(
            f"{feature} with a sam section relies on DeepSpeed internals verified only with deepspeed=="
            f"{' or '.join(TESTED_VERSIONS)}; installed: {deepspeed.__version__}. Pin deepspeed=="
            f"{TESTED_VERSIONS[-1]} or use bf16 / ZeRO 0-2 in fp32")


def _is_zero(optimizer: Any) -> bool:
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    return isinstance(optimizer, ZeROOptimizer)


def loss_scale(engine: Any) -> float | None:
    """The engine's current fp16 loss scale, or ``None`` when the engine is not fp16."""
    if not engine.fp16_enabled():
        return None
    return float(engine.optimizer.loss_scale)


def scale_loss(engine: Any, loss: torch.Tensor) -> torch.Tensor:
    """``loss`` scaled as the engine's fp16 backward scales it (a DeepSpeed-fixed ZeRO-0 included).

    ZeRO 1-3: ``optimizer.scale_if_loss`` (the engine's own call). ZeRO-0: ``loss.float() *
    cur_scale``, the expression of ``FP16_Optimizer.backward`` and ``FP16_UnfusedOptimizer.backward``.
    """
    optimizer = engine.optimizer
    if _is_zero(optimizer):
        return optimizer.scale_if_loss(loss)
    return loss.float() * optimizer.loss_scale


def unscale(grads: Sequence[torch.Tensor | None], scale: float) -> list[torch.Tensor | None]:
    """``g / scale`` in float32 (non-finite entries stay non-finite)."""
    inv = 1.0 / scale
    return [None if g is None else g.float().mul_(inv) for g in grads]


def descent_loss(engine: Any, loss: torch.Tensor) -> torch.Tensor:
    """What to hand ``engine.backward``: ``loss``, pre-scaled under ZeRO-0 fp16 (see the module doc)."""
    if engine.fp16_enabled() and not _is_zero(engine.optimizer):
        return scale_loss(engine, loss)
    return loss
