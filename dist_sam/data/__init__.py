"""Input pipeline: ImageNet-layout folders through DALI or torchvision, sharded across ranks.

Usage (per rank, after ``torch.cuda.set_device(local_rank)`` on GPU machines)::

    loaders = build_loader(DataConfig(root="data/digits", image_size=32, batch_size=64), rank, world_size)
    for epoch in range(start_epoch, epochs):
        loaders.train.set_epoch(epoch)
        for images, labels, valid in loaders.train:       # images NCHW float32, labels int64
            ...
        totals = sum(count_correct(model(x), y, v) for x, y, v in loaders.val)
        dist.all_reduce(totals)                            # [top1_hits, top5_hits, num_valid]

Every rank runs ``len(loader)`` steps; ``valid`` is ``False`` for samples repeated to pad the epoch
(and for files replaced because they failed to decode), so only valid samples may be counted. The
demo dataset: ``dist-sam make-demo-data data/digits`` (see ``dist_sam.data.demo``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .config import BACKENDS, IMAGENET_MEAN, IMAGENET_STD, DataConfig
from .dali import dali_available
from .folder import DatasetLayoutError, SplitIndex, drop_bad_files, scan_split
from .sharding import Batch, ShardedLoader, count_correct, shard_plan

__all__ = [
    "build_loader",
    "Loaders",
    "DataConfig",
    "Batch",
    "ShardedLoader",
    "count_correct",
    "shard_plan",
    "scan_split",
    "resolve_backend",
    "resolve_device",
    "DatasetLayoutError",
    "BACKENDS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]


class Loaders(NamedTuple):
    """The two splits' loaders; both follow the ``ShardedLoader`` interface."""

    train: ShardedLoader
    val: ShardedLoader


def resolve_backend(backend: str) -> str:
    """``"auto"`` becomes ``"dali"`` when DALI can be imported, else ``"torchvision"``."""
    if backend == "auto":
        return "dali" if dali_available() else "torchvision"
    return backend


def resolve_device(device: str) -> torch.device:
    """``"auto"`` becomes the current CUDA device when there is one, else the CPU."""
    if device == "auto":
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"DataConfig.device is {device!r} but CUDA is not available; use 'auto' or 'cpu'")
    return resolved


def _index(cfg: DataConfig, split: str) -> tuple[SplitIndex, dict[str, str]]:
    index = scan_split(cfg.root, split)
    return drop_bad_files(index, cfg.cpu_threads) if cfg.validate_files else (index, {})


def build_loader(cfg: DataConfig, rank: int, world_size: int) -> Loaders:
    """Build this rank's training and validation loaders.

    Both splits are scanned and checked before anything runs: a missing split, a split without
    images, an empty class folder or train/val class lists that differ raise
    ``DatasetLayoutError``; unreadable files are skipped, counted in ``loader.bad_files`` and
    warned about once.

    Args:
        cfg: Data settings.
        rank: This process's rank, in ``[0, world_size)``.
        world_size: Number of data-parallel ranks.

    Returns:
        ``Loaders(train, val)``; iterating either yields ``Batch(images, labels, valid)``.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
    backend, device = resolve_backend(cfg.backend), resolve_device(cfg.device)
    (train, train_bad), (val, val_bad) = _index(cfg, "train"), _index(cfg, "val")
    if train.classes != val.classes:
        only = sorted(set(train.classes) ^ set(val.classes))[:5]
        raise DatasetLayoutError(
            f"train and val must have the same class folders; they differ in {only} "
            f"({len(train.classes)} train / {len(val.classes)} val classes)"
        )
    if backend == "dali":
        from .dali import DaliLoader as Loader
    else:
        from .folder import TorchvisionLoader as Loader
    loaders = Loaders(
        Loader(train, cfg, rank=rank, world_size=world_size, train=True, device=device),
        Loader(val, cfg, rank=rank, world_size=world_size, train=False, device=device),
    )
    loaders.train.bad_files.update(train_bad)
    loaders.val.bad_files.update(val_bad)
    return loaders
