"""What :class:`~dist_sam.integrations.hf.SAMTrainer` adds around an engine, and SAM's numbers for its logs."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ...optim.rwsam import RWSAM

__all__ = ["Recording", "StepStats"]


class Recording:
    """An engine of the step core, as is, except that it keeps each group's ascent norm and scales
    the descent loss by ``1/divisor`` (Trainer's accumulation: ``k`` calls make one step).

    Every other attribute is the wrapped engine's, so :func:`dist_sam.core.sam_passes` runs it
    unchanged.
    """

    def __init__(self, engine: Any, divisor: int = 1) -> None:
        self._engine, self.divisor = engine, divisor
        self.norms: list[torch.Tensor] = []

    def __getattr__(self, name: str) -> Any:
        if name == "_engine":  # not set yet (copy, unpickling): avoid recursing
            raise AttributeError(name)
        return getattr(self._engine, name)

    def norm(self, grads) -> torch.Tensor:
        value = self._engine.norm(grads)
        self.norms.append(value.detach())
        return value

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        self._engine.backward(loss / self.divisor if self.divisor != 1 else loss, last=last)


def weight_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy of RW-SAM's normalized weights ``a / sum(a)`` (``log b`` when they are uniform, as SAM's)."""
    p = weights.detach().float()
    p = p / p.sum()
    return -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum()


class StepStats:
    """Device-side sums of SAM's numbers between two logs (no host sync until :meth:`drain`)."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    def _add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self._sums[name] = self._sums[name] + value if name in self._sums else value.clone()
        self._counts[name] = self._counts.get(name, 0) + 1

    def record(self, norms: list[torch.Tensor], sam: Any) -> None:
        """One call's ascent norms (one per group) and, for RW-SAM, its last group's weights' entropy."""
        for n in norms:
            self._add("sam_ascent_norm", n)
        norms.clear()
        if isinstance(sam, RWSAM) and sam.last_weights is not None:
            self._add("rwsam_weight_entropy", weight_entropy(sam.last_weights))

    def drain(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """The means since the last drain, each averaged over ranks by ``reduce``; then start again."""
        out = {name: reduce(total / self._counts[name]).item() for name, total in sorted(self._sums.items())}
        self._sums, self._counts = {}, {}
        return out
