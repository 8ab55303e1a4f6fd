"""The shared shard plan, top-k counting and DataConfig validation: pure, no image decoding."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from dist_sam.data import DataConfig, count_correct, shard_plan

CASES = list(itertools.product([1, 7, 15, 64, 101], [1, 2, 3, 8], [1, 4, 16]))


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("n,world,batch", CASES)
def test_each_sample_valid_exactly_once_and_equal_steps(n, world, batch, train):
    plan = shard_plan(n, world_size=world, batch_size=batch, epoch=3, seed=1, train=train)
    assert plan.indices.shape == plan.valid.shape == (world * plan.per_rank,)
    # Every sample appears exactly once among the valid entries; the repeats are all flagged.
    assert np.bincount(plan.indices[plan.valid], minlength=n).tolist() == [1] * n
    assert plan.valid.sum() == n
    assert plan.per_rank == (
        math.ceil(math.ceil(n / world) / batch) * batch if train else math.ceil(n / world)
    )
    if train:
        assert plan.per_rank % batch == 0  # full batches: static shapes, never a BatchNorm batch of 1


@pytest.mark.parametrize("n,world,batch", [(15, 2, 4), (101, 3, 16), (64, 8, 8)])
def test_drop_last_keeps_full_batches_and_no_repeats(n, world, batch):
    plan = shard_plan(n, world_size=world, batch_size=batch, epoch=0, seed=0, train=True, drop_last=True)
    assert plan.per_rank % batch == 0 and plan.valid.all()
    assert len(set(plan.indices.tolist())) == len(plan.indices) == world * plan.per_rank


def test_drop_last_without_a_full_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="drop_last"):
        shard_plan(5, world_size=2, batch_size=4, epoch=0, seed=0, train=True, drop_last=True)


def test_train_order_depends_on_seed_and_epoch_only():
    a = shard_plan(50, world_size=2, batch_size=4, epoch=2, seed=7, train=True)
    b = shard_plan(50, world_size=2, batch_size=4, epoch=2, seed=7, train=True)
    assert np.array_equal(a.indices, b.indices)
    other_epoch = shard_plan(50, world_size=2, batch_size=4, epoch=3, seed=7, train=True)
    other_seed = shard_plan(50, world_size=2, batch_size=4, epoch=2, seed=8, train=True)
    assert not np.array_equal(a.indices, other_epoch.indices)
    assert not np.array_equal(a.indices, other_seed.indices)
    val = shard_plan(50, world_size=2, batch_size=4, epoch=2, seed=7, train=False)
    assert val.indices.tolist() == list(range(50))  # validation keeps folder order


def test_count_correct_ignores_padded_samples():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.2], [0.3, 0.2, 0.5], [0.0, 1.0, 0.0]])
    labels = torch.tensor([1, 2, 0, 1])
    valid = torch.tensor([True, True, True, False])  # the last one is a repeat: it must not count
    top1, top2, n = count_correct(logits, labels, valid, topk=(1, 2)).tolist()
    assert (top1, top2, n) == (1.0, 3.0, 3.0)
    # k larger than the class count is capped (10-class demo data with top-5 is fine, so is top-5 of 3).
    assert count_correct(logits, labels, valid, topk=(5,)).tolist() == [3.0, 3.0]


@pytest.mark.parametrize(
    "field,value",
    [
        ("backend", "nvjpeg"),
        ("image_size", 4),
        ("batch_size", 0),
        ("num_workers", -1),
        ("seed", -1),
        ("device", "gpu0"),
        ("channels_last", "yes"),
        ("val_batch_size", 0),
        ("dali_cpu_threads", 0),
        ("root", ""),
    ],
)
def test_config_errors_name_the_field_and_value(field, value):
    with pytest.raises(ValueError, match=f"DataConfig.{field} ") as err:
        DataConfig(**{"root": "data", field: value})
    assert repr(value) in str(err.value)


def test_config_is_keyword_only_with_sane_defaults():
    with pytest.raises(TypeError):
        DataConfig("data")  # type: ignore[misc]
    cfg = DataConfig(root="data", num_workers=0)
    assert cfg.eval_batch_size == cfg.batch_size and cfg.cpu_threads == 1 and cfg.backend == "auto"
