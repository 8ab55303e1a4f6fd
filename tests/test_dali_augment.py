"""The DALI loader's training augmentation is keyed by (seed, epoch, sample index): a world-size
change keeps every sample's crop and mirror, bit-equal on CPU, as the torchvision loader does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dist_sam.data import DataConfig, build_loader
from dist_sam.data.dali import augment_params, dali_available
from test_train_run import make_tiny_dataset

pytestmark = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")


def _steps(root, rank, world, batch, epoch):
    cfg = DataConfig(root=str(root), backend="dali", image_size=12, batch_size=batch, num_workers=0, device="cpu")
    loader = build_loader(cfg, rank, world).train
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone(), v.clone()) for x, y, v in loader]


def test_dali_crops_are_the_same_at_world_size_1_and_2(tmp_path):
    root = make_tiny_dataset(str(tmp_path / "data"), train_per_class=10, size=20)  # 40 images, 3 steps of 16
    for epoch in (0, 1):
        one = _steps(root, 0, 1, 16, epoch)
        two = [_steps(root, r, 2, 8, epoch) for r in (0, 1)]
        assert len(one) == len(two[0]) == len(two[1]) == 3
        for s, (x, y, v) in enumerate(one):
            x2 = torch.cat([two[0][s][0], two[1][s][0]])
            y2, v2 = torch.cat([two[0][s][1], two[1][s][1]]), torch.cat([two[0][s][2], two[1][s][2]])
            real = v & v2  # padding repeats differ with the world size; every real sample is compared
            assert real.sum() >= 8 and torch.equal(y[real], y2[real])
            assert torch.equal(x[real], x2[real]), f"epoch {epoch} step {s}: crops differ across world sizes"


def test_augment_params_are_random_resized_crops_keyed_by_seed_epoch_index():
    windows = {augment_params(0, e, i, 64, 48)[0].tobytes() + augment_params(0, e, i, 64, 48)[1].tobytes()
               for e in range(3) for i in range(20)}
    assert len(windows) == 60  # every (epoch, index) its own window
    for e in range(3):
        for i in range(50):
            (x, y), (w, h), mirror = augment_params(7, e, i, 64, 48)
            assert 0 <= x and x + w <= 64 and 0 <= y and y + h <= 48 and mirror in (0, 1)
            assert 0.08 * 64 * 48 * 0.9 <= w * h and 3 / 4 * 0.85 <= w / h <= 4 / 3 * 1.15  # rounding slack
    a, b = augment_params(7, 1, 5, 64, 48), augment_params(7, 1, 5, 64, 48)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert np.mean([augment_params(3, 0, i, 64, 48)[2] for i in range(400)]) == pytest.approx(0.5, abs=0.08)
