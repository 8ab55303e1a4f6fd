"""dist_sam.integrations.lightning under Trainer(strategy="ddp", accelerator="cpu") on 2 gloo processes.

One spawn runs every Lightning DDP check; the tests assert on what it returned:

* SAM through the mixin (fp32 with accumulation and clipping; bf16-mixed; m-SAM) equals dist-sam's
  own ``sam_step`` on a plain DDP model, same weights and batches, to 1e-6; replicas bit-equal;
* a SAM step makes exactly the gradient all-reduces (calls and bytes) of Lightning's own plain
  manual-optimization step;
* fit, Lightning checkpoint, a new Trainer resuming from it continues bit-equal to an
  uninterrupted run (``interval=3`` makes SAM's step counter matter); SAM's state round-trips;
* what the integration cannot run is refused with a ValueError before training.
"""

from __future__ import annotations

import os

import lightning.pytorch as L
import pytest
import torch

from dist_utils import run_distributed
from lightning_utils import B, Net, PlainNet, loader, reference, state, trainer

pytestmark = pytest.mark.slow
STEPS = 3
# name -> (precision, sam section, accumulation_steps, clip_grad_norm)
CASES = {
    "fp32-accum2-clip": ("32-true", dict(rho=0.05), 2, 0.05),
    "bf16-mixed": ("bf16-mixed", dict(rho=0.05), 1, None),
    "fp32-msam-asam": ("32-true", dict(variant="asam", rho=0.5, ascent="micro", micro_batch_size=2), 1, None),
}
DTYPES = {"32-true": None, "bf16-mixed": torch.bfloat16}


def _fit(module, steps, rank, **kwargs):
    t = trainer(max_steps=steps, **kwargs)
    t.fit(module, loader(rank, steps))
    return t


def _worker(rank, world_size, tmp):
    torch.set_num_threads(1)
    out = {"cases": {}, "plain_bytes": None}
    for name, (precision, sam, k, clip) in CASES.items():
        module = Net(count=True, sam=sam, accumulation_steps=k, clip_grad_norm=clip)
        t = _fit(module, STEPS, rank, precision=precision)
        ref, ref_bytes = reference(rank, STEPS, sam, accumulation_steps=k, clip_grad_norm=clip,
                                   dtype=DTYPES[precision])
        out["cases"][name] = dict(state=state(module.net), ref=ref, bytes=module.step_bytes, ref_bytes=ref_bytes,
                                  global_step=t.global_step, num_steps=module.sam_optimizer.num_steps)
    plain = PlainNet(count=True)
    _fit(plain, STEPS, rank)
    out["plain_bytes"] = plain.step_bytes
    out["resume"] = _resume(rank, tmp)
    return out


def _resume(rank, tmp):
    """2 epochs of 2 batches uninterrupted vs 1 epoch, Lightning checkpoint, a fresh Trainer resuming it.

    The checkpoint is taken at an epoch's end: Lightning resumes a plain DataLoader mid-epoch from
    its first batch again (its own warning says so), which no optimizer could continue exactly.
    """
    sam = dict(rho=0.05, interval=3)  # steps 0 and 3 are SAM steps: a lost counter shows
    whole = Net(sam=sam)
    trainer(max_steps=-1, max_epochs=2).fit(whole, loader(rank, 2))
    first = Net(sam=sam)
    t = trainer(max_steps=-1, max_epochs=1)
    t.fit(first, loader(rank, 2))
    path = os.path.join(tmp, "lightning.ckpt")
    t.save_checkpoint(path)  # every rank: the hook gathers SAM's per-rank state
    saved_sam = first.sam_optimizer.state_dict()
    second = Net(sam=sam)
    t2 = trainer(max_steps=-1, max_epochs=2)
    t2.fit(second, loader(rank, 2), ckpt_path=path)
    return dict(whole=state(whole.net), resumed=state(second.net), global_step=t2.global_step,
                num_steps=second.sam_optimizer.num_steps, saved_sam=saved_sam, loaded_sam=second.sam_at_start)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed(_worker, world_size=2, args=(str(tmp_path_factory.mktemp("pl")),), timeout=600)


def _max_diff(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.parametrize("case", sorted(CASES))
def test_mixin_equals_ddp_sam_step(results, case):
    for rank_result in results:
        r = rank_result["cases"][case]
        assert r["state"].keys() == r["ref"].keys()
        assert _max_diff(r["state"], r["ref"]) <= 1e-6, case
        assert r["global_step"] == STEPS and r["num_steps"] == STEPS  # each SAM step is one Lightning step
    a, b = (rank_result["cases"][case]["state"] for rank_result in results)
    assert all(torch.equal(a[k], b[k]) for k in a if "running" not in k)  # replicas bit-equal


@pytest.mark.parametrize("case", sorted(CASES))
def test_sam_step_reduces_as_lightnings_plain_step(results, case):
    for rank_result in results:
        r = rank_result["cases"][case]
        plain = rank_result["plain_bytes"]
        assert len(plain) == STEPS and plain[0][0] >= 1 and plain[0][1] > 0
        assert r["bytes"] == plain == r["ref_bytes"], (case, r["bytes"], plain)


def test_resume_from_lightning_checkpoint_is_bit_equal(results):
    for rank_result in results:
        r = rank_result["resume"]
        assert all(torch.equal(r["whole"][k], r["resumed"][k]) for k in r["whole"])
        assert r["global_step"] == 4 and r["num_steps"] == 4
        saved, loaded = r["saved_sam"], r["loaded_sam"]
        assert saved["sam"] == loaded["sam"] == {"num_steps": 2}
        assert saved["param_groups"] == loaded["param_groups"]
        for i, s in saved["state"].items():
            assert torch.equal(s["momentum_buffer"], loaded["state"][i]["momentum_buffer"])


def _single_trainer(**kwargs):
    return L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


@pytest.mark.parametrize("options, match", [
    (dict(accumulation_steps=0), "accumulation_steps"),
    (dict(clip_grad_norm=-1.0), "clip_grad_norm"),
    (dict(sam={"rho": -1}), "sam.rho"),
    (dict(sam={"variant": "nope"}), "sam.variant"),
])
def test_bad_options_raise_at_construction(options, match):
    with pytest.raises(ValueError, match=match):
        Net(**options)


@pytest.mark.parametrize("precision", ["bf16-true", "64-true"])
def test_unsupported_precision_raises_before_training(precision):
    module = Net()
    with pytest.raises(ValueError, match="precision"):
        _single_trainer(precision=precision).fit(module, loader(0, 1))
    assert module._sam_runner is None  # refused before any step
