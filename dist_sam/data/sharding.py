"""Which sample each rank reads at each step: one plan shared by the DALI and torchvision backends.

Epoch ``e`` orders the ``N`` samples by a permutation seeded with ``(seed, e)`` (training) or keeps
folder order (validation) and repeats samples cyclically up to ``world_size * per_rank`` entries.
Training is ordered by *global* sample index: with the global batch ``B = world_size * batch_size``,
step ``s`` reads positions ``[s * B, (s + 1) * B)`` of the epoch's order and rank ``r`` the slice
``[s * B + r * batch_size, s * B + (r + 1) * batch_size)`` of it, so a step sees the same samples
whatever the world size (``launch/train.py`` re-plans the per-worker batch on a resume at another
world size). The plan lists each rank's entries contiguously -- rank ``r`` reads ``[r * per_rank,
(r + 1) * per_rank)`` of ``indices``, exactly how DALI's ``readers.file(shard_id=r,
num_shards=world_size)`` splits a list whose length is a multiple of ``world_size``. Every rank
runs ``ceil(per_rank / batch_size)`` steps, and each entry carries ``valid``: ``False`` for the
repeats, so every sample counts exactly once per epoch.

* training: ``per_rank`` is ``ceil(N / world_size)`` rounded up to whole batches (static shapes,
  never a batch of one for BatchNorm), or rounded down with ``drop_last``;
* validation: ``per_rank = ceil(N / world_size)``; the last batch may be partial.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from .badfiles import warn_bad_files
from .config import DataConfig

__all__ = ["Batch", "ShardPlan", "shard_plan", "epoch_seed", "count_correct", "ShardedLoader"]


class Batch(NamedTuple):
    """One step's data for one rank; unpacks as ``images, labels, valid = batch``.

    Attributes:
        images: ``float32`` ``[B, 3, H, W]`` normalized images (``channels_last`` memory format if
            configured), on the configured device.
        labels: ``int64`` ``[B]`` class indices, on the same device.
        valid: ``bool`` ``[B]``: ``False`` for samples repeated to pad the epoch and for unreadable
            files replaced at run time. Metrics must count only valid samples.
    """

    images: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor


class ShardPlan(NamedTuple):
    """The whole epoch's list, padded; rank ``r`` reads ``[r * per_rank, (r + 1) * per_rank)``."""

    indices: np.ndarray  # int64 [world_size * per_rank], sample index into the split
    valid: np.ndarray  # bool, same shape; False for repeats
    per_rank: int

    def rank_slice(self, rank: int) -> slice:
        return slice(rank * self.per_rank, (rank + 1) * self.per_rank)


def epoch_seed(seed: int, epoch: int, salt: int = 0) -> int:
    """A 31-bit seed derived from ``(seed, epoch, salt)`` (DALI takes non-negative int32 seeds)."""
    return int(np.random.SeedSequence([seed, epoch, salt]).generate_state(1)[0] & 0x7FFFFFFF)


def shard_plan(
    num_samples: int,
    *,
    world_size: int,
    batch_size: int,
    epoch: int,
    seed: int,
    train: bool,
    drop_last: bool = False,
) -> ShardPlan:
    """Build the epoch's padded sample list (see the module docstring)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    per_rank = math.ceil(num_samples / world_size)
    if train and drop_last:
        per_rank = (num_samples // world_size) // batch_size * batch_size
        if per_rank == 0:
            raise ValueError(
                f"drop_last=True leaves no full batch: {num_samples} samples < world_size {world_size} "
                f"x batch_size {batch_size}; lower batch_size or set drop_last=False"
            )
    elif train:
        per_rank = math.ceil(per_rank / batch_size) * batch_size
    order = np.arange(num_samples, dtype=np.int64)
    if train:
        order = np.random.default_rng(epoch_seed(seed, epoch)).permutation(num_samples)
    total = per_rank * world_size
    indices, valid = np.resize(order, total), np.arange(total) < num_samples
    if train:  # global order (steps, ranks, batch) -> each rank's entries contiguous (ranks, steps, batch)
        layout = lambda a: a.reshape(-1, world_size, batch_size).transpose(1, 0, 2).reshape(-1)  # noqa: E731
        indices, valid = layout(indices), layout(valid)
    return ShardPlan(indices, valid, per_rank)


def count_correct(
    logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, topk: Sequence[int] = (1, 5)
) -> torch.Tensor:
    """Top-k hits over valid samples, ready for one ``all_reduce(SUM)`` across ranks.

    Example::

        totals = sum(count_correct(model(x), y, v) for x, y, v in val_loader)
        dist.all_reduce(totals)          # [top1_hits, top5_hits, num_valid]
        top1, top5 = (totals[:-1] / totals[-1]).tolist()

    Returns:
        ``float64`` ``[len(topk) + 1]``: hits for each ``k`` (capped at the class count), then the
        number of valid samples.
    """
    k_max = min(max(topk), logits.shape[1])
    pred = logits.topk(k_max, dim=1).indices
    hit = pred.eq(labels.view(-1, 1)) & valid.view(-1, 1)
    counts = [hit[:, : min(k, k_max)].any(dim=1).sum() for k in topk]
    return torch.stack(counts + [valid.sum()]).to(torch.float64)


class ShardedLoader:
    """Common epoch/step bookkeeping of both backends.

    * ``len(loader)``: steps per epoch, identical on every rank.
    * ``num_samples``: readable samples in the split (each counted once per epoch via ``valid``).
    * ``set_epoch(e)``: select epoch ``e``'s order and augmentation seed; call before iterating.
    * ``bad_files``: ``{path: reason}`` of files skipped or replaced, for logging.
    * Training may ignore ``valid`` (the repeats are fewer than ``world_size * batch_size`` per
      epoch, as with ``DistributedSampler``) or weight the loss by it; evaluation must use it.
    * Resume (``resume_policy = "exact"``): ``state_dict()`` is ``{"epoch", "step"}``, the same on
      every rank, so rank 0's copy suffices; take it after the step on the last batch. After
      ``load_state_dict(sd)``, ``set_epoch(sd["epoch"])`` keeps the position and the next iteration
      starts at batch ``sd["step"]`` with exactly the samples and augmentations an uninterrupted run
      would have produced.
    """

    resume_policy = "exact"

    def __init__(
        self,
        num_samples: int,
        cfg: DataConfig,
        *,
        rank: int,
        world_size: int,
        train: bool,
        device: torch.device,
    ) -> None:
        self.num_samples, self.rank, self.world_size, self.train = num_samples, rank, world_size, train
        self.batch_size = cfg.batch_size if train else cfg.eval_batch_size
        self.seed, self.drop_last, self.channels_last, self.device = (
            cfg.seed,
            cfg.drop_last,
            cfg.channels_last,
            device,
        )
        self.epoch, self.bad_files, self._warned = 0, {}, False
        self._step, self._start_step = 0, 0
        self._len = math.ceil(self.plan().per_rank / self.batch_size)

    def plan(self) -> ShardPlan:
        """The current epoch's plan, for all ranks."""
        return shard_plan(
            self.num_samples,
            world_size=self.world_size,
            batch_size=self.batch_size,
            epoch=self.epoch,
            seed=self.seed,
            train=self.train,
            drop_last=self.drop_last,
        )

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch``; a position restored by ``load_state_dict`` for it is kept."""
        if epoch != self.epoch:
            self._start_step = 0
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        """``{"epoch": e, "step": k}``: ``k`` batches of epoch ``e`` have been yielded."""
        return {"epoch": self.epoch, "step": self._step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at batch ``state["step"]`` of epoch ``state["epoch"]`` on the next iteration."""
        step = int(state["step"])
        if not 0 <= step <= len(self):
            raise ValueError(f"state['step'] must be in [0, {len(self)}], got {step}")
        self.epoch, self._start_step = int(state["epoch"]), step

    def __iter__(self) -> Iterator[Batch]:
        start, self._start_step = self._start_step, 0
        self._step = start
        for batch in self._batches(self.plan(), start):
            self._step += 1
            yield batch

    def _batches(self, plan: ShardPlan, start: int) -> Iterator[Batch]:
        raise NotImplementedError

    def _note_runtime_failures(self, failed: dict[str, str], where: str) -> None:
        """Count files that failed to decode mid-epoch; warn once per loader."""
        new = {p: r for p, r in failed.items() if p not in self.bad_files}
        if new and not self._warned:
            warn_bad_files(new, f"{where!r} (rank {self.rank})", "replaced and masked out of `valid`")
            self._warned = True
        self.bad_files.update(new)

    def _to_batch(self, images: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> Batch:
        """Move to the device; ``channels_last`` changes strides only, the shape stays NCHW."""
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return Batch(
            images,
            labels.to(self.device, torch.int64, non_blocking=True),
            valid.to(self.device, non_blocking=True),
        )
