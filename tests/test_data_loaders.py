"""Both backends end to end: sharding, labels, agreement, determinism, resume, GPU path.

Each image is a distinct flat color (red = 15 + 20 * id) with a faint asymmetric texture, so a
sample's id can be read back from any crop of it and augmentation still changes the pixels.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from dist_sam.data import IMAGENET_MEAN, IMAGENET_STD, DataConfig, build_loader
from dist_sam.data.dali import dali_available
from dist_sam.data.demo import make_digits

BACKENDS = [
    "torchvision",
    pytest.param(
        "dali", marks=pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
    ),
]
VAL_COUNTS = (5, 4, 2)  # 11 validation images: odd, so 2 shards need one repeat
TRAIN_COUNTS = (3, 3, 3)


def _write(root, split, counts, first_id=0):
    rng = np.random.default_rng(first_id)
    ident = first_id
    for label, count in enumerate(counts):
        os.makedirs(root / split / f"class{label}", exist_ok=True)
        for _ in range(count):
            h, w = rng.integers(24, 48, size=2)
            yy, xx = np.mgrid[0:h, 0:w]
            texture = 6 * np.sin(xx / 3.0 + yy / 7.0) * (xx > w // 3)  # left/right asymmetric
            pixels = np.stack([15 + 20 * ident + texture, 60 + 40 * label + texture, 100 + 0 * texture], -1)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                root / split / f"class{label}" / f"img{ident}.JPEG", quality=95
            )
            ident += 1


def _ids(images):
    """Recover each image's id from its mean red value, undoing the normalization."""
    red = images[:, 0].float().mean(dim=(1, 2)) * (255 * IMAGENET_STD[0]) + 255 * IMAGENET_MEAN[0]
    return ((red - 15) / 20).round().long().tolist()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    _write(root, "train", TRAIN_COUNTS, first_id=0)
    _write(root, "val", VAL_COUNTS, first_id=0)
    return root


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    make_digits(str(root))
    return root


def _cfg(root, backend, **kw):
    return DataConfig(
        **{
            "root": str(root),
            "backend": backend,
            "image_size": 16,
            "batch_size": 4,
            "num_workers": 0,
            "device": "cpu",
            **kw,
        }
    )


def _epoch(loader, epoch=0):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone(), v.clone()) for x, y, v in loader]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split,counts", [("val", VAL_COUNTS), ("train", TRAIN_COUNTS)])
def test_every_sample_counts_once_across_two_shards_with_folder_labels(tiny, backend, split, counts):
    seen, steps = Counter(), set()
    for rank in range(2):
        loader = getattr(build_loader(_cfg(tiny, backend), rank, 2), split)
        batches = _epoch(loader, epoch=1)
        steps.add((len(loader), len(batches)))
        for x, y, v in batches:
            assert x.shape[1:] == (3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
            for ident, label in zip(_ids(x[v]), y[v].tolist()):
                seen[ident] += 1
                assert label == np.searchsorted(np.cumsum(counts), ident, side="right")  # folder class
            assert set(_ids(x[~v])) <= set(range(sum(counts)))  # repeats are real samples, flagged
    assert len(steps) == 1 and next(iter(steps))[0] == next(iter(steps))[1]  # same step count on both ranks
    assert seen == Counter(range(sum(counts)))  # each sample exactly once among valid entries


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_seed_gives_the_same_batches_and_epochs_differ(tiny, backend):
    first = _epoch(build_loader(_cfg(tiny, backend, seed=3), 0, 1).train, epoch=2)
    again = _epoch(build_loader(_cfg(tiny, backend, seed=3), 0, 1).train, epoch=2)
    other = _epoch(build_loader(_cfg(tiny, backend, seed=3), 0, 1).train, epoch=5)
    for a, b in zip(first, again):
        assert all(torch.equal(s, t) for s, t in zip(a, b))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_epoch_is_exact(tiny, backend):
    loader = build_loader(_cfg(tiny, backend, batch_size=2), 0, 1).train
    full = _epoch(loader, epoch=4)
    loader.set_epoch(4)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert state == {"epoch": 4, "step": 2}
    resumed = build_loader(_cfg(tiny, backend, batch_size=2), 0, 1).train
    resumed.load_state_dict(state)
    rest = _epoch(resumed, epoch=4)  # set_epoch of the saved epoch keeps the position
    assert len(rest) == len(full) - 2
    for a, b in zip(full[2:], rest):
        assert all(torch.equal(s, t) for s, t in zip(a, b))


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
@pytest.mark.parametrize("channels_last", [False, True])
def test_dali_and_torchvision_agree_on_the_demo_data(digits, channels_last):
    out = {}
    for backend in ("dali", "torchvision"):
        cfg = _cfg(digits, backend, image_size=32, batch_size=128, channels_last=channels_last)
        loaders = build_loader(cfg, 1, 2)
        out[backend] = {split: _epoch(getattr(loaders, split)) for split in ("train", "val")}
    for split in ("train", "val"):
        (dali, torchvision) = (torch.cat([x for x, _, _ in out[b][split]]) for b in ("dali", "torchvision"))
        assert dali.shape == torchvision.shape and dali.dtype == torchvision.dtype == torch.float32
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert dali.is_contiguous(memory_format=fmt) and torchvision.is_contiguous(memory_format=fmt)
        for images in (dali, torchvision):  # the demo data is rendered with ImageNet's statistics
            assert abs(images.mean().item()) < 0.25 and 0.8 < images.std().item() < 1.2
        labels = [torch.cat([y for _, y, _ in out[b][split]]) for b in ("dali", "torchvision")]
        assert torch.equal(*labels)  # one shared plan: the same samples in the same order
    val_gap = (
        (
            torch.cat([x for x, _, _ in out["dali"]["val"]])
            - torch.cat([x for x, _, _ in out["torchvision"]["val"]])
        )
        .abs()
        .mean()
    )
    assert val_gap < 0.1  # deterministic val transforms: the same pixels up to resampling details


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: DALI mixed (GPU) decode is not exercised"
)
@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
def test_dali_gpu_mixed_decode_matches_cpu(digits):
    cpu = _epoch(build_loader(_cfg(digits, "dali", image_size=32, batch_size=64), 0, 2).val)
    loaders = build_loader(_cfg(digits, "dali", image_size=32, batch_size=64, device="cuda"), 0, 2)
    assert loaders.val.device_id is not None  # the mixed decode path was selected
    gpu = _epoch(loaders.val)
    assert gpu[0][0].is_cuda and gpu[0][1].is_cuda and gpu[0][2].is_cuda
    for (xc, yc, vc), (xg, yg, vg) in zip(cpu, gpu):
        assert torch.equal(yc, yg.cpu()) and torch.equal(vc, vg.cpu())
        assert (xc - xg.cpu()).abs().mean() < 0.1  # nvJPEG vs libjpeg-turbo differ by rounding only
    x, y, v = next(iter(loaders.train))
    assert x.is_cuda and x.shape == (64, 3, 32, 32)


def test_import_and_auto_backend_work_without_dali():
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.startswith('nvidia.dali'): raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import dist_sam.data as d\n"
        "assert d.resolve_backend('auto') == 'torchvision', d.resolve_backend('auto')\n"
        "from dist_sam.data.dali import _import_dali\n"
        "try:\n    _import_dali()\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'dist-sam[dali]'" in out.stdout
