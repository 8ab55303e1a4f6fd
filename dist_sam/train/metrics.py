"""Evaluation (top-1/top-5 reduced across ranks), step timing, and rank-0 TensorBoard scalars."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..data import count_correct

__all__ = ["evaluate", "StepTimer", "Scalars"]

log = logging.getLogger("dist_sam.train")


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Top-1, top-5 and mean cross-entropy over every valid validation sample of every rank.

    Padding repeats (``valid=False``) are not counted, so the totals are exact for any world size.
    """
    was_training = model.training
    model.eval()
    totals = None
    for images, labels, valid in loader:
        ctx = torch.autocast(images.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with ctx:
            logits = model(images)
        losses = nn.functional.cross_entropy(logits.float(), labels, reduction="none")
        batch = torch.cat([count_correct(logits, labels, valid), (losses * valid).sum().double().view(1)])
        totals = batch if totals is None else totals + batch
    model.train(was_training)
    if totals is None:
        raise RuntimeError("the validation loader yielded no batch")
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)  # [top1 hits, top5 hits, valid count, loss sum]
    top1, top5, count, loss = totals.tolist()
    return {"top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count, "loss": loss / count, "num_samples": int(count)}


class StepTimer:
    """Wall-clock per phase (``data``, ``step``, ``checkpoint``, ...), synchronizing CUDA when timing.

    ``with timer("step"): ...`` adds to that phase; :meth:`breakdown` gives milliseconds per step.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.totals[phase] = self.totals.get(phase, 0.0) + time.perf_counter() - start

    def breakdown(self, steps: int) -> dict[str, float]:
        """Mean milliseconds per training step of each phase."""
        return {f"{k}_ms": 1e3 * v / max(1, steps) for k, v in self.totals.items()}


class Scalars:
    """TensorBoard ``SummaryWriter`` on rank 0 (a no-op elsewhere, or without tensorboard)."""

    def __init__(self, log_dir: str | None) -> None:
        self.writer = None
        if log_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed (pip install 'dist-sam[demo]'): no scalars are written")
            return
        self.writer = SummaryWriter(log_dir=log_dir)

    def add(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
