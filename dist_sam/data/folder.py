"""The ImageNet folder layout and the torchvision backend.

``root/{train,val}/<class>/*.JPEG`` is scanned and checked once; the torchvision backend is
``ImageFolder`` + ``DistributedSampler`` + ``DataLoader`` with worker processes.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, pil_loader

from .badfiles import find_bad_files, warn_bad_files
from .config import IMAGENET_MEAN, IMAGENET_STD, VAL_CROP_FRACTION, DataConfig
from .sharding import Batch, ShardedLoader, ShardPlan, epoch_seed

__all__ = ["DatasetLayoutError", "SplitIndex", "scan_split", "build_transform", "TorchvisionLoader"]

_LAYOUT = "root/{train,val}/<class>/*.JPEG"


class DatasetLayoutError(ValueError):
    """The dataset folder does not hold a usable split; raised before training starts."""


@dataclass(frozen=True)
class SplitIndex:
    """One split's files, in ``ImageFolder`` order (sorted classes, sorted files)."""

    root: str
    classes: tuple[str, ...]
    files: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.files)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def scan_split(root: str, split: str) -> SplitIndex:
    """Index ``root/split``, raising ``DatasetLayoutError`` for a missing or empty split or class."""
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise DatasetLayoutError(
            f"split {split!r} not found: {path!r} is not a directory (expected {_LAYOUT})"
        )
    classes = sorted(e.name for e in os.scandir(path) if e.is_dir())
    if not classes:
        raise DatasetLayoutError(f"split {split!r} has no class folders in {path!r} (expected {_LAYOUT})")
    files, labels, empty = [], [], []
    for label, cls in enumerate(classes):
        found = sorted(
            os.path.join(d, f)
            for d, _, names in os.walk(os.path.join(path, cls), followlinks=True)
            for f in names
            if _is_image(f)
        )
        if not found:
            empty.append(cls)
        files += found
        labels += [label] * len(found)
    if empty:
        raise DatasetLayoutError(
            f"split {split!r} has {len(empty)} class folder(s) without images in {path!r}: {empty[:5]} "
            f"(image extensions: {', '.join(IMG_EXTENSIONS)})"
        )
    return SplitIndex(path, tuple(classes), tuple(files), tuple(labels))


def drop_bad_files(index: SplitIndex, num_threads: int) -> tuple[SplitIndex, dict[str, str]]:
    """Skip unreadable files (counted and warned about once); error if none is left."""
    bad = find_bad_files(index.files, num_threads)
    warn_bad_files(bad, repr(index.root), "skipped")
    keep = [i for i, f in enumerate(index.files) if f not in bad]
    if not keep:
        raise DatasetLayoutError(
            f"no readable image in {index.root!r}: all {len(index)} files failed the check"
        )
    pick = lambda xs: tuple(xs[i] for i in keep)  # noqa: E731
    return replace(index, files=pick(index.files), labels=pick(index.labels)), bad


def build_transform(image_size: int, train: bool) -> T.Compose:
    """The torchvision twin of the DALI pipeline: the same crops, flip and normalization."""
    if train:
        head = [
            T.RandomResizedCrop(image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)),
            T.RandomHorizontalFlip(),
        ]
    else:
        head = [T.Resize(int(image_size / VAL_CROP_FRACTION)), T.CenterCrop(image_size)]
    return T.Compose(head + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class IndexedImageFolder(ImageFolder):
    """``ImageFolder`` over a validated ``SplitIndex``, keyed by ``(index, aug_seed, valid)``.

    Seeding each sample's augmentation makes it a function of ``(seed, epoch, index)`` alone, so
    batches are reproducible and a resumed epoch continues exactly. A file that still fails to
    decode is replaced by the mean image and flagged: the item's last field is its index, else -1.
    """

    def __init__(self, index: SplitIndex, transform: T.Compose, image_size: int) -> None:
        self._index, self._size = index, image_size
        super().__init__(index.root, transform=transform, loader=pil_loader)  # pil_loader: any mode -> RGB

    def find_classes(self, directory):  # noqa: D102 -- reuse the scan instead of walking again
        return list(self._index.classes), {c: i for i, c in enumerate(self._index.classes)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):  # noqa: D102
        return list(zip(self._index.files, self._index.labels))

    def __getitem__(self, key: tuple[int, int, bool]):
        index, aug_seed, valid = key
        path, label = self.samples[index]
        try:
            image = self.loader(path)
        except Exception:  # noqa: BLE001 -- counted and warned about by the main process
            return torch.zeros(3, self._size, self._size), label, False, index
        with torch.random.fork_rng(devices=[]):  # never disturb the caller's RNG (num_workers=0)
            torch.manual_seed(aug_seed)
            return self.transform(image), label, valid, -1


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """``worker_init_fn``: a loader process ignores SIGTERM/SIGUSR1/SIGUSR2, as torchrun signals the
    whole process group; the training process decides when to stop and shuts its loaders down."""
    for name in ("SIGTERM", "SIGUSR1", "SIGUSR2"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)


class ShardSampler(DistributedSampler):
    """A ``DistributedSampler`` that follows the shared ``ShardPlan`` instead of its own order.

    Yields ``(index, aug_seed, valid)`` keys from ``start`` (a multiple of the batch size) on, so
    both backends read the same samples in the same order and resume at any step.
    """

    def __init__(
        self, dataset, plan: ShardPlan, rank: int, world_size: int, seed: int, epoch: int, start: int
    ) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False, seed=seed)
        self.epoch = epoch
        rows = plan.rank_slice(rank)
        self._keys = list(zip(plan.indices[rows].tolist(), plan.valid[rows].tolist()))[start:]
        self._base = epoch_seed(seed, epoch) * 1_000_003

    def __iter__(self) -> Iterator[tuple[int, int, bool]]:
        for index, valid in self._keys:
            yield index, (self._base + index) % 2**63, valid

    def __len__(self) -> int:
        return len(self._keys)


class TorchvisionLoader(ShardedLoader):
    """The torchvision backend; see ``ShardedLoader`` for the interface."""

    def __init__(
        self,
        index: SplitIndex,
        cfg: DataConfig,
        *,
        rank: int,
        world_size: int,
        train: bool,
        device: torch.device,
    ) -> None:
        super().__init__(len(index), cfg, rank=rank, world_size=world_size, train=train, device=device)
        self.index, self.num_workers = index, cfg.num_workers
        self.dataset = IndexedImageFolder(index, build_transform(cfg.image_size, train), cfg.image_size)

    def _batches(self, plan: ShardPlan, start: int) -> Iterator[Batch]:
        sampler = ShardSampler(
            self.dataset, plan, self.rank, self.world_size, self.seed, self.epoch, start * self.batch_size
        )
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            worker_init_fn=ignore_stop_signals if self.num_workers else None,
            # its own generator: starting an epoch (or resuming mid-epoch) never draws from the
            # global RNG, whose streams (dropout) then resume exactly
            generator=torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, 2)),
        )
        for images, labels, valid, failed in loader:
            failed_paths = {
                self.index.files[i]: "decode failed at run time" for i in failed.tolist() if i >= 0
            }
            self._note_runtime_failures(failed_paths, self.index.root)
            yield self._to_batch(images, labels, valid)
