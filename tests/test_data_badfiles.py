"""The files real ImageNet contains, in both backends, and layout errors before training starts."""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from dist_sam.data import DataConfig, DatasetLayoutError, build_loader
from dist_sam.data.badfiles import check_image
from dist_sam.data.dali import dali_available

BACKENDS = [
    "torchvision",
    pytest.param(
        "dali", marks=pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
    ),
]
ODD = ("cmyk", "gray", "png")  # decodable by content: must come out as 3-channel RGB
BROKEN = ("truncated", "empty", "garbage")  # must be skipped or replaced, counted, warned about once


def _jpeg_bytes(image, **kw):
    buf = io.BytesIO()
    image.save(buf, **kw)
    return buf.getvalue()


def _write_kinds(folder, rng):
    """One file of each kind, named ``<kind>.JPEG`` like ImageNet's odd ones."""
    os.makedirs(folder, exist_ok=True)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    data = {
        "good": _jpeg_bytes(rgb, format="JPEG", quality=90),
        "cmyk": _jpeg_bytes(rgb.convert("CMYK"), format="JPEG", quality=90),
        "gray": _jpeg_bytes(rgb.convert("L"), format="JPEG", quality=90),
        "png": _jpeg_bytes(rgb, format="PNG"),
        "empty": b"",
        "garbage": rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(),
    }
    data["truncated"] = data["good"][: len(data["good"]) // 2]
    for kind, payload in data.items():
        with open(os.path.join(folder, f"{kind}.JPEG"), "wb") as fh:
            fh.write(payload)


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        _write_kinds(root / split / "a", rng)
        _write_kinds(root / split / "b", rng)
    return root


def _cfg(root, backend, **kw):
    return DataConfig(
        **{
            "root": str(root),
            "backend": backend,
            "image_size": 24,
            "batch_size": 4,
            "num_workers": 0,
            "device": "cpu",
            **kw,
        }
    )


def test_quick_check_sorts_every_kind(messy):
    folder = messy / "val" / "a"
    for kind in ("good",) + ODD:
        assert check_image(str(folder / f"{kind}.JPEG")) is None, kind
    for kind in BROKEN:
        assert check_image(str(folder / f"{kind}.JPEG")) is not None, kind


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_files_decode_to_rgb_and_broken_ones_are_skipped_with_one_warning(messy, backend):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaders = build_loader(_cfg(messy, backend), 0, 2)
    unreadable = [w for w in caught if "unreadable" in str(w.message)]
    assert len(unreadable) == 2  # once per split, each naming the count
    assert all(str(w.message).startswith("6 unreadable") for w in unreadable)
    for loader in loaders:
        assert loader.num_samples == 8 and len(loader.bad_files) == 6
        assert {os.path.basename(p)[:-5] for p in loader.bad_files} == set(BROKEN)
    seen = 0
    for rank in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            val = build_loader(_cfg(messy, backend), rank, 2).val
        for x, _, v in val:
            assert x.shape[1:] == (3, 24, 24) and torch.isfinite(x).all()
            seen += int(v.sum())
    assert seen == 8  # good, cmyk, gray, png in each of the two classes


@pytest.mark.parametrize("backend", BACKENDS)
def test_files_that_fail_mid_epoch_are_replaced_masked_and_warned_once(messy, backend):
    """With the up-front check off, decoding fails mid-epoch; the epoch must still complete."""
    loader = build_loader(_cfg(messy, backend, validate_files=False), 0, 1).val
    assert loader.num_samples == 14 and len(loader) == 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = [(x.clone(), v.clone()) for x, _, v in loader]
    assert len(batches) == len(loader)
    assert sum(int(v.sum()) for _, v in batches) == 8  # the 6 broken samples are masked out
    assert {os.path.basename(p)[:-5] for p in loader.bad_files} == set(BROKEN)
    assert len([w for w in caught if "unreadable" in str(w.message)]) == 1
    assert all(torch.isfinite(x).all() and x.shape[1] == 3 for x, _ in batches)


def test_torchvision_workers_replace_runtime_failures(messy):
    loader = build_loader(_cfg(messy, "torchvision", validate_files=False, num_workers=2), 0, 1).train
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        valid = torch.cat([v for _, _, v in loader])
    assert int(valid.sum()) == 8 and len(loader.bad_files) == 6
    assert len([w for w in caught if "unreadable" in str(w.message)]) == 1


def _layout(root, spec):
    """spec: {relative folder: number of JPEGs}."""
    for folder, count in spec.items():
        os.makedirs(root / folder, exist_ok=True)
        for i in range(count):
            Image.new("RGB", (16, 16), (i, 0, 0)).save(root / folder / f"{i}.JPEG")


@pytest.mark.parametrize(
    "spec,match",
    [
        ({"train/a": 2}, "split 'val' not found"),
        ({"train/a": 2, "val": 0}, "split 'val' has no class folders"),
        ({"train/a": 2, "val/a": 0}, r"class folder\(s\) without images.*\['a'\]"),
        ({"train/a": 2, "train/b": 0, "val/a": 1, "val/b": 1}, r"split 'train' has 1 class folder.*\['b'\]"),
        ({"train/a": 2, "train/b": 1, "val/a": 1, "val/c": 1}, "same class folders"),
    ],
)
def test_layout_problems_fail_before_training_with_a_clear_error(tmp_path, spec, match):
    _layout(tmp_path, spec)
    with pytest.raises(DatasetLayoutError, match=match):
        build_loader(_cfg(tmp_path, "torchvision"), 0, 1)


def test_split_whose_files_are_all_unreadable_is_an_error(tmp_path):
    _layout(tmp_path, {"train/a": 1, "val/a": 0})
    (tmp_path / "val" / "a" / "broken.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetLayoutError, match="no readable image"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_loader(_cfg(tmp_path, "torchvision"), 0, 1)
