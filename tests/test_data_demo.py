"""``dist-sam make-demo-data``: the digits dataset, its label noise, and synthetic JPEGs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from dist_sam.data.demo import flip_labels, main


def _files(root, split):
    return {f: int(label) for label in os.listdir(root / split) for f in os.listdir(root / split / label)}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    assert main([str(root), "--image-size", "24"]) == 0
    return root


def test_digits_written_in_imagenet_layout_with_a_fixed_split(clean):
    train, val = _files(clean, "train"), _files(clean, "val")
    assert len(train) == 1437 and len(val) == 360 and not set(train) & set(val)
    assert sorted(os.listdir(clean / "train")) == [str(d) for d in range(10)]
    assert all(int(f[6:10]) % 5 == 0 for f in val)  # every fifth digit is validation
    from sklearn.datasets import load_digits

    truth = load_digits().target
    assert all(truth[int(f[6:10])] == label for f, label in {**train, **val}.items())
    with Image.open(clean / "val" / "0" / "digit_0000.JPEG") as img:
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (24, 24)
    assert json.loads((clean / "meta.json").read_text())["flipped"] == []


def test_label_noise_flips_a_seeded_fraction_of_train_only(clean, tmp_path):
    assert main([str(tmp_path / "a"), "--image-size", "8", "--label-noise", "0.25", "--seed", "3"]) == 0
    assert main([str(tmp_path / "b"), "--image-size", "8", "--label-noise", "0.25", "--seed", "3"]) == 0
    noisy, base = _files(tmp_path / "a", "train"), _files(clean, "train")
    changed = {f for f in base if noisy[f] != base[f]}
    assert len(changed) == round(0.25 * 1437)
    assert _files(tmp_path / "a", "val") == _files(clean, "val")  # evaluation labels stay clean
    assert _files(tmp_path / "b", "train") == noisy  # same seed, same noise
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert {os.path.basename(e["file"]) for e in meta["flipped"]} == changed


def test_flip_labels_always_changes_the_class():
    labels = np.arange(1000) % 10
    noisy = flip_labels(labels, 0.8, seed=0)
    assert (noisy != labels).sum() == 800 and noisy.min() >= 0 and noisy.max() <= 9
    with pytest.raises(ValueError, match="label_noise"):
        flip_labels(labels, 1.5, seed=0)


def test_synthetic_photo_sized_jpegs(tmp_path):
    assert main([str(tmp_path), "--synthetic", "12", "--image-size", "64"]) == 0
    train, val = _files(tmp_path, "train"), _files(tmp_path, "val")
    assert len(train) == 12 and len(val) == 2
    with Image.open(next((tmp_path / "train" / "0").iterdir())) as img:
        assert img.format == "JPEG" and img.size == (64, 64)


def test_refuses_to_overwrite_without_force(clean, capsys):
    assert main([str(clean), "--image-size", "8"]) == 2
    assert "--force" in capsys.readouterr().err
