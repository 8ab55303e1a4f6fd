"""Non-finite storms: ``run.max_skipped_steps`` skipped steps in a row stop the run, named.

A non-finite loss or gradient on any rank reaches every rank through the gradient all-reduce, so
every rank skips the same steps (the step core leaves the weights untouched; under fp16 the
``GradScaler`` skips and lowers its scale). Whether a step was skipped is read from a step hook on
the base optimizer (it did not run), so watching costs nothing per step: no collective, no sync.
Which pass overflowed is told apart on each rank by the loss at ``w`` and the ascent gradient's
norm (both of the ascent pass), else it was the descent pass; at the limit, the ranks' findings are
gathered once (a collective every rank reaches at the same step), and the run stops with a
:class:`~dist_sam.train.faults.NonFiniteError` naming the step, the pass, the rank and the loss scale.
No checkpoint is written then: the last one (weights finite) is what the next run resumes from.

Testing aid, first attempt only: :data:`NAN_ENV` ``"RANK:FROM_STEP:PASS"`` (``PASS``: ``ascent``,
``descent`` or ``both``) makes that rank's per-sample losses NaN in that pass from that step on.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from .faults import NonFiniteError
from .state import gather

__all__ = ["NonFiniteGuard", "NanLosses", "NAN_ENV"]

NAN_ENV = "DIST_SAM_NAN_LOSS"


class NonFiniteGuard:
    """Counts skipped steps in a row; raises at ``limit``.

    Args:
        optimizer: the SAM-family optimizer (its ``base_optimizer`` gets the step hook).
        scaler: the fp16 ``GradScaler``, or ``None``.
        limit: ``run.max_skipped_steps``.
        plain: ``sam: null`` (one pass: a skip is the descent's).
    """

    def __init__(self, optimizer, scaler, limit: int, plain: bool) -> None:
        self.optimizer, self.scaler, self.limit, self.plain = optimizer, scaler, limit, plain
        self.in_a_row, self.skipped_total, self.stepped = 0, 0, False
        self.ascent_norms: list[torch.Tensor] = []
        base = getattr(optimizer, "base_optimizer", optimizer)
        base.register_step_post_hook(self._stepped)
        if hasattr(optimizer, "compute_perturbation"):
            inner = optimizer.compute_perturbation

            def record(*args, grad_norm=None, **kwargs):  # the ascent norm, kept as a tensor: no sync
                if grad_norm is not None:
                    self.ascent_norms.append(grad_norm.detach())
                return inner(*args, grad_norm=grad_norm, **kwargs)
            optimizer.compute_perturbation = record

    def _stepped(self, *_: Any) -> None:
        self.stepped = True

    def _pass(self, loss: torch.Tensor) -> str:
        if self.plain:
            return "descent"
        if not bool(torch.isfinite(loss)) or not all(bool(torch.isfinite(n)) for n in self.ascent_norms):
            return "ascent"
        return "descent"

    def check(self, loss: torch.Tensor, step: int) -> None:
        """After step ``step`` (every rank): count a skip; raise :class:`NonFiniteError` at the limit."""
        skipped, self.stepped = not self.stepped, False
        finding = self._pass(loss) if skipped else None
        self.ascent_norms = []
        if not skipped:
            self.in_a_row = 0
            return
        self.in_a_row, self.skipped_total = self.in_a_row + 1, self.skipped_total + 1
        if self.in_a_row < self.limit:
            return
        passes = gather(finding)  # every rank skipped this step too: they all get here together
        ranks = [r for r, p in enumerate(passes) if p == "ascent"]
        where = f"the ascent pass (non-finite on rank(s) {ranks})" if ranks else "the descent pass"
        scale = f"loss scale {self.scaler.get_scale():g}" if self.scaler is not None else "no loss scaling"
        raise NonFiniteError(f"{self.in_a_row} non-finite steps in a row (run.max_skipped_steps={self.limit}), the "
                             f"last at global step {step}: {where} overflowed; {scale}. The weights were left "
                             "untouched and no checkpoint was written; the last checkpoint holds finite weights")


class NanLosses:
    """A per-sample loss that returns NaN on :data:`NAN_ENV`'s rank, pass and steps (testing aid)."""

    def __init__(self, loss_fn, rank: int, spec: str) -> None:
        r, first, self.which = spec.split(":")
        self.loss_fn, self.active, self.first = loss_fn, int(r) == rank, int(first)
        self.step, self.calls = 0, 0

    @classmethod
    def wrap(cls, loss_fn, rank: int):
        spec = os.environ.get(NAN_ENV)
        if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            return loss_fn
        return cls(loss_fn, rank, spec)

    def at_step(self, step: int) -> None:
        self.step, self.calls = step, 0

    def __call__(self, outputs, targets):
        losses = self.loss_fn(outputs, targets)
        pass_ = "ascent" if self.calls % 2 == 0 else "descent"
        self.calls += 1
        if self.active and self.step >= self.first and self.which in (pass_, "both"):
            return losses * math.nan
        return losses
