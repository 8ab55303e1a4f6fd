"""The DALI backend: NVIDIA's ResNet-50 reference pipeline, sharded by rank, on GPU or CPU.

``readers.file(shard_id=rank, num_shards=world_size)`` reads the epoch's list from the shared
``ShardPlan`` (shuffled with a per-epoch seed, padded so every shard has the same length), then:

* train: ``decoders.image_slice`` of a random-resized-crop window (area 0.08-1, ratio 3/4-4/3)
  -> ``resize`` to ``image_size`` -> ``crop_mirror_normalize`` (ImageNet mean/std x 255, mirror
  with probability 1/2);
* val: ``decoders.image`` -> ``resize`` shorter side to ``image_size / 0.875`` -> center crop.

Decoding is ``"mixed"`` (nvJPEG) when batches go to a CUDA device; otherwise only CPU operators
run and the pipeline gets ``device_id=None`` (DALI's requirement without a GPU). The reader's
labels are *positions in the plan*, mapped back to class labels and the ``valid`` mask here.

The training augmentation is a function of ``(seed, epoch, sample index)`` alone, as the
torchvision loader's: each sample's crop window and mirror flag are drawn here from a generator
seeded with exactly that (:func:`augment_params`, from the image's size read from its header) and
fed to the pipeline through ``external_source``; DALI's own random streams, which follow the
sample's slot in a rank's batch, are not used. A world-size change therefore keeps the crops.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .badfiles import check_image
from .config import IMAGENET_MEAN, IMAGENET_STD, VAL_CROP_FRACTION, DataConfig
from .folder import SplitIndex
from .sharding import Batch, ShardedLoader, ShardPlan, epoch_seed

__all__ = ["DaliLoader", "dali_available", "build_pipeline", "augment_params"]

_PREFETCH = 2
_INSTALL = "the DALI backend needs NVIDIA DALI: pip install 'dist-sam[dali]' (or set backend='torchvision')"


def dali_available() -> bool:
    """Whether ``nvidia.dali`` imports (a broken CUDA install counts as unavailable)."""
    try:
        _import_dali()
    except (ImportError, OSError):
        return False
    return True


def _import_dali() -> Any:
    try:
        from nvidia import dali
        from nvidia.dali import fn, types  # noqa: F401 -- submodules used as dali.fn / dali.types
        from nvidia.dali.plugin import pytorch  # noqa: F401
    except (ImportError, OSError) as err:
        raise ImportError(f"{_INSTALL} ({err})") from err
    return dali


def augment_params(seed: int, epoch: int, index: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Sample ``index``'s training crop ``(x, y)``, ``(w, h)`` and mirror flag in epoch ``epoch``.

    ``RandomResizedCrop``'s rule (area 0.08-1 of the image, log-uniform aspect ratio 3/4-4/3, up to
    10 tries, else the central crop of the clamped ratio), drawn from a generator seeded with
    ``(seed, epoch, index)`` only.
    """
    rng = np.random.default_rng([seed, epoch, index])
    area, log_ratio = width * height, (np.log(3 / 4), np.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = np.exp(rng.uniform(*log_ratio))
        w, h = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            break
    else:
        ratio = width / height
        if ratio < 3 / 4:
            w, h = width, int(round(width * 4 / 3))
        elif ratio > 4 / 3:
            w, h = int(round(height * 4 / 3)), height
        else:
            w, h = width, height
        x, y = (width - w) // 2, (height - h) // 2
    mirror = int(rng.random() < 0.5)
    return np.array([x, y], np.float32), np.array([w, h], np.float32), mirror


def build_pipeline(
    files: list[str],
    *,
    shard_id: int,
    num_shards: int,
    train: bool,
    image_size: int,
    channels_last: bool,
    batch_size: int,
    num_threads: int,
    device_id: int | None,
    seed: int,
    augment: Any = None,
) -> Any:
    """The reference pipeline over ``files``; outputs ``(images, plan positions)``.

    ``device_id=None`` builds a CPU-only pipeline; an integer selects that GPU and mixed decode.
    ``augment`` (training): a callable from the iteration to the batch's crop anchors, crop shapes
    and mirror flags (lists of arrays, one per sample in reader order); without it DALI draws them.
    """
    dali = _import_dali()
    fn, types = dali.fn, dali.types
    gpu = device_id is not None
    # nvJPEG scratch sizes from NVIDIA's ResNet-50 example; they avoid reallocations on big images.
    decode = (
        dict(device="mixed", device_memory_padding=211025920, host_memory_padding=140544512)
        if gpu
        else dict(device="cpu")
    )
    pipe = dali.Pipeline(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        seed=seed,
        prefetch_queue_depth=_PREFETCH,
    )
    with pipe:
        # random_shuffle=False: the plan already holds the epoch's global shuffle.
        jpegs, positions = fn.readers.file(
            files=files,
            labels=list(range(len(files))),
            shard_id=shard_id,
            num_shards=num_shards,
            random_shuffle=False,
            pad_last_batch=True,
            name="Reader",
        )
        if train and augment is not None:
            anchor, shape, mirror = fn.external_source(source=augment, num_outputs=3, batch=True)
            images = fn.decoders.image_slice(jpegs, anchor, shape, normalized_anchor=False, normalized_shape=False,
                                             output_type=types.RGB, **decode)
            images = fn.resize(images, resize_x=image_size, resize_y=image_size)
        elif train:
            images = fn.decoders.image_random_crop(
                jpegs,
                output_type=types.RGB,
                random_area=[0.08, 1.0],
                random_aspect_ratio=[3 / 4, 4 / 3],
                num_attempts=100,
                **decode,
            )
            images = fn.resize(images, resize_x=image_size, resize_y=image_size)
            mirror = fn.random.coin_flip(probability=0.5)
        else:
            images = fn.decoders.image(jpegs, output_type=types.RGB, **decode)
            images = fn.resize(images, resize_shorter=int(image_size / VAL_CROP_FRACTION))
            mirror = 0
        images = fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            output_layout="HWC" if channels_last else "CHW",
            crop=(image_size, image_size),
            mean=[255 * m for m in IMAGENET_MEAN],
            std=[255 * s for s in IMAGENET_STD],
            mirror=mirror,
        )
        pipe.set_outputs(images, positions)
    return pipe


class DaliLoader(ShardedLoader):
    """The DALI backend; see ``ShardedLoader`` for the interface.

    One pipeline is built per epoch (tens of milliseconds); training crops and mirrors come from
    :func:`augment_params` per sample. Resuming at step ``k`` rebuilds it and discards ``k`` batches. A file that still fails to decode mid-epoch
    (the up-front check missed it) is found by fully decoding the files near the failing step; it is
    replaced by a readable file, flagged ``valid=False``, and the epoch resumes where it stopped.
    """

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
        _import_dali()
        super().__init__(len(index), cfg, rank=rank, world_size=world_size, train=train, device=device)
        self.index, self.image_size, self.num_threads = index, cfg.image_size, cfg.cpu_threads
        self.device_id = (
            (device.index if device.index is not None else torch.cuda.current_device())
            if device.type == "cuda"
            else None
        )
        self._labels = np.asarray(index.labels, dtype=np.int64)
        self._replaced: dict[str, str] = {}  # unreadable path -> readable stand-in
        self._sizes: dict[str, tuple[int, int]] = {}  # path -> (width, height), from the header once

    def _size(self, path: str) -> tuple[int, int]:
        if path not in self._sizes:
            from PIL import Image

            try:
                with Image.open(path) as image:  # the header only: no decode
                    self._sizes[path] = image.size
            except Exception:  # noqa: BLE001 -- unreadable: DALI's decode fails on it and it is replaced
                return 1, 1
        return self._sizes[path]

    def _augment(self, plan: ShardPlan, files: list[str]):
        """``external_source`` callback: iteration -> this rank's batch's crop windows and mirrors."""
        rows, seed, epoch = plan.rank_slice(self.rank), self.seed, self.epoch

        def batch(iteration: int):
            start = rows.start + iteration * self.batch_size
            if start >= rows.stop:
                raise StopIteration
            pos = np.minimum(np.arange(start, start + self.batch_size), rows.stop - 1)  # DALI pads with the last
            out = [augment_params(seed, epoch, int(plan.indices[p]), *self._size(files[p])) for p in pos]
            return [a for a, _, _ in out], [s for _, s, _ in out], [np.array(m, np.int32) for _, _, m in out]
        return batch

    def _batches(self, plan: ShardPlan, start: int) -> Iterator[Batch]:
        step = start
        while True:
            try:
                for batch in self._run(plan, step):
                    yield batch
                    step += 1
                return
            except RuntimeError as err:  # DALI reports a decoder failure as RuntimeError
                if not self._replace_unreadable(plan, step):
                    raise RuntimeError(
                        f"DALI failed at step {step} of epoch {self.epoch} on rank {self.rank}, "
                        "and no unreadable file was found near it"
                    ) from err

    def _run(self, plan: ShardPlan, start: int) -> Iterator[Batch]:
        from nvidia.dali.plugin.pytorch import DALIClassificationIterator, LastBatchPolicy

        files = [self.index.files[i] for i in plan.indices]
        replaced = np.array([f in self._replaced for f in files])
        files = [self._replaced.get(f, f) for f in files]
        pipe = build_pipeline(
            files,
            shard_id=self.rank,
            num_shards=self.world_size,
            train=self.train,
            image_size=self.image_size,
            channels_last=self.channels_last,
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            seed=epoch_seed(self.seed, self.epoch, 1 + self.rank),
            augment=self._augment(plan, files) if self.train else None,
        )
        # Every shard holds plan.per_rank entries, so all ranks get the same number of steps;
        # PARTIAL returns the real last batch and stops at the shard's end (no wrap into the next epoch).
        batches = DALIClassificationIterator(
            pipe, reader_name="Reader", last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False
        )
        valid = plan.valid & ~replaced
        for step, out in enumerate(batches):
            if step < start:
                continue  # replay: same seed, same random draws, discarded
            images, pos = out[0]["data"], out[0]["label"].view(-1).cpu().numpy()
            if self.channels_last:
                images = images.permute(0, 3, 1, 2)  # NHWC storage viewed as NCHW: channels_last strides
            labels = torch.from_numpy(self._labels[plan.indices[pos]])
            yield self._to_batch(images, labels, torch.from_numpy(valid[pos]))

    def _replace_unreadable(self, plan: ShardPlan, step: int) -> bool:
        """Fully decode the files around ``step``; replace the unreadable ones. True if any found."""
        rows = plan.rank_slice(self.rank)
        lo = rows.start + step * self.batch_size
        hi = min(rows.stop, lo + (_PREFETCH + 2) * self.batch_size)
        near = dict.fromkeys(
            self._replaced.get(f, f) for f in (self.index.files[i] for i in plan.indices[lo:hi])
        )
        bad = {f: r for f in near if (r := check_image(f, full=True)) is not None}
        good = next((f for f in near if f not in bad), None) or next(
            f for f in self.index.files if check_image(f, full=True) is None
        )
        self._replaced.update(dict.fromkeys(bad, good))
        self._note_runtime_failures(bad, self.index.root)
        return bool(bad)
