"""``DataConfig``: the input pipeline's settings, validated once, before any file is read."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["DataConfig", "BACKENDS", "IMAGENET_MEAN", "IMAGENET_STD", "VAL_CROP_FRACTION"]

BACKENDS = ("auto", "dali", "torchvision")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Validation resizes the shorter side to image_size / 0.875 (256 for 224), then center-crops.
VAL_CROP_FRACTION = 0.875

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _int_at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"DataConfig.{name} must be an integer >= {low}, got {value!r}")


@dataclass(kw_only=True)
class DataConfig:
    """Input pipeline settings shared by the DALI and torchvision backends.

    Attributes:
        root: Dataset folder in the ImageNet layout, ``root/{train,val}/<class>/*.JPEG``.
        backend: ``"dali"``, ``"torchvision"``, or ``"auto"`` (DALI when it can be imported).
        image_size: Side of the square training crop and of the validation center crop.
        batch_size: Training batch size per rank.
        val_batch_size: Validation batch size per rank; ``None`` means ``batch_size``.
        num_workers: DataLoader worker processes (torchvision backend).
        dali_cpu_threads: DALI CPU threads per rank; ``None`` means ``max(1, num_workers)``.
        channels_last: Return images in ``torch.channels_last`` memory format (still NCHW shape).
        seed: Base seed; epoch ``e`` shuffles and augments with a seed derived from ``(seed, e)``.
        device: Where batches land: ``"auto"`` (the current CUDA device, else CPU), ``"cpu"``,
            ``"cuda"`` or ``"cuda:N"``. A CUDA device also selects DALI's mixed (GPU) decode.
        drop_last: Training only: drop the last incomplete batch of each rank instead of
            filling it with repeated samples (flagged ``valid=False``).
        validate_files: Scan every file's header and end marker once, up front, and skip the
            unreadable ones (counted and warned about once). Costs ~30 us per file.
    """

    root: str
    backend: str = "auto"
    image_size: int = 224
    batch_size: int = 256
    val_batch_size: int | None = None
    num_workers: int = 4
    dali_cpu_threads: int | None = None
    channels_last: bool = False
    seed: int = 0
    device: str = "auto"
    drop_last: bool = False
    validate_files: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.root, str) or not self.root:
            raise ValueError(f"DataConfig.root must be a non-empty path string, got {self.root!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"DataConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        _int_at_least("image_size", self.image_size, 8)
        _int_at_least("batch_size", self.batch_size, 1)
        if self.val_batch_size is not None:
            _int_at_least("val_batch_size", self.val_batch_size, 1)
        _int_at_least("num_workers", self.num_workers, 0)
        if self.dali_cpu_threads is not None:
            _int_at_least("dali_cpu_threads", self.dali_cpu_threads, 1)
        _int_at_least("seed", self.seed, 0)
        if not isinstance(self.device, str) or not _DEVICE.match(self.device):
            raise ValueError(
                f"DataConfig.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}"
            )
        for name in ("channels_last", "drop_last", "validate_files"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"DataConfig.{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def eval_batch_size(self) -> int:
        """The validation batch size per rank."""
        return self.batch_size if self.val_batch_size is None else self.val_batch_size

    @property
    def cpu_threads(self) -> int:
        """DALI CPU threads per rank."""
        return self.dali_cpu_threads or max(1, self.num_workers)
