"""SAMTrainer under Trainer's ``deepspeed=`` config (ZeRO-2 and ZeRO-0, CPU: DS_ACCELERATOR=cpu) equals dist-sam's
own ``sam_step`` under DDP on the same batches; collectives as Trainer's plain DeepSpeed step; resume."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# as tests/test_deepspeed.py: one JIT build of DeepSpeed's CPU comm op, in a cache of our own
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions",
                                                           "dist_sam_tests"))

import torch  # noqa: E402
import transformers  # noqa: E402

from dist_sam.config import SamConfig  # noqa: E402
from dist_sam.integrations.hf import SAMTrainer  # noqa: E402
from dist_utils import CollectiveCounts, run_distributed  # noqa: E402
from test_integrations_hf import (SGD_ARGS, StepCollectives, Tokens, flat, make_args, recording, reference,  # noqa: E402
                                 tiny_distilbert)

_COUNTER = CollectiveCounts()  # installed once per worker process, before the engines bind any collective


def ds_config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9}


def _run(cls, out, init, stage, resume=None, **kwargs):
    model = tiny_distilbert()
    model.load_state_dict(init)
    counting = StepCollectives(_COUNTER)
    # SGD: Adam's first steps (lr * sign(g) where g ~ 0) would magnify ZeRO's last-bit reduction differences
    args = make_args(out, deepspeed=ds_config(stage), save_strategy="steps", save_steps=1, max_steps=2, **SGD_ARGS)
    trainer = recording(cls)(model=model, args=args, train_dataset=Tokens(), callbacks=[counting], **kwargs)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, counting.counts


def _ds_worker(rank: int, world_size: int, out: str) -> dict:
    os.environ["DS_ACCELERATOR"] = "cpu"
    _COUNTER.install()
    init = tiny_distilbert().state_dict()
    rwsam = SamConfig(variant="rwsam", rho=0.05, lam=0.5, estimator="fd", mu=1e-3)
    run, counts = _run(SAMTrainer, out, init, 2, sam=rwsam)
    ref, _, _ = reference(init, run.batches, rwsam, k=2, ddp=True, sgd=True)
    resumed, _ = _run(SAMTrainer, out + "_r", init, 2, resume=os.path.join(out, "checkpoint-1"), sam=rwsam)
    plain, plain_counts = _run(transformers.Trainer, out + "_plain", init, 2)
    sam = SamConfig(variant="sam", rho=0.05)
    zero0, _ = _run(SAMTrainer, out + "_zero0", init, 0, sam=sam)
    ref0, _, _ = reference(init, zero0.batches, sam, k=2, ddp=True, sgd=True)
    return dict(trainer=flat(run.model_wrapped.module), ref=ref, resumed=flat(resumed.model_wrapped.module),
                zero0=flat(zero0.model_wrapped.module), ref0=ref0, counts=counts, plain_counts=plain_counts, logs=run.state.log_history,
                resumed_batches=[b["input_ids"] for b in resumed.batches], batches=[b["input_ids"] for b in run.batches])


@pytest.fixture(scope="module")
def ds_results(tmp_path_factory):
    return run_distributed(_ds_worker, world_size=2, args=(str(tmp_path_factory.mktemp("hf_ds") / "run"),),
                           timeout=600)


@pytest.mark.slow
def test_zero2_trainer_step_is_sam_step(ds_results):
    for r in ds_results:
        torch.testing.assert_close(r["trainer"], r["ref"], rtol=0, atol=1e-6)
    assert torch.equal(ds_results[0]["trainer"], ds_results[1]["trainer"])  # replicas bit-equal
    assert all("sam_ascent_norm" in e and "rwsam_weight_entropy" in e for e in ds_results[0]["logs"] if "loss" in e)


@pytest.mark.slow
def test_zero0_trainer_step_is_sam_step(ds_results):
    for r in ds_results:
        torch.testing.assert_close(r["zero0"], r["ref0"], rtol=0, atol=1e-6)
    assert torch.equal(ds_results[0]["zero0"], ds_results[1]["zero0"])


@pytest.mark.slow
def test_zero2_local_ascent_costs_the_plain_trainer_step(ds_results):
    counts, plain = ds_results[0]["counts"], ds_results[0]["plain_counts"]
    assert counts and counts == plain, (counts, plain)


@pytest.mark.slow
def test_zero2_resume_from_trainer_checkpoint_is_bit_equal(ds_results):
    for r in ds_results:
        assert len(r["resumed_batches"]) == 2  # step 2's micro-batches, as the first run saw them
        assert all(torch.equal(a, b) for a, b in zip(r["resumed_batches"], r["batches"][2:]))
        assert torch.equal(r["resumed"], r["trainer"])


# -- ZeRO-3: the adapter's gathered-parameter perturbation (dist_sam.distributed.zero3) under Trainer ----------
def full_zero3(module) -> torch.Tensor:
    """The whole model, gathered from ZeRO-3's partitions (in ``parameters()`` order, as :func:`flat`)."""
    import deepspeed

    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return torch.cat([p.detach().reshape(-1).clone() for p in params])


def _z3_worker(rank: int, world_size: int, out: str) -> dict:
    os.environ["DS_ACCELERATOR"] = "cpu"
    _COUNTER.install()
    init = tiny_distilbert().state_dict()
    rwsam = SamConfig(variant="rwsam", rho=0.05, lam=0.5, estimator="last_layer")
    run, counts = _run(SAMTrainer, out, init, 3, sam=rwsam)
    ref, _, _ = reference(init, run.batches, rwsam, k=2, ddp=True, sgd=True)
    resumed, _ = _run(SAMTrainer, out + "_r", init, 3, resume=os.path.join(out, "checkpoint-1"), sam=rwsam)
    plain, plain_counts = _run(transformers.Trainer, out + "_plain", init, 3)
    with pytest.raises(ValueError, match="estimator='fd'"):
        _run(SAMTrainer, out + "_fd", init, 3, sam=SamConfig(variant="rwsam", estimator="fd", mu=1e-3))
    return dict(trainer=full_zero3(run.model_wrapped.module), ref=ref, resumed=full_zero3(resumed.model_wrapped.module),
                counts=counts, plain_counts=plain_counts, logs=run.state.log_history,
                resumed_batches=[b["input_ids"] for b in resumed.batches], batches=[b["input_ids"] for b in run.batches])


@pytest.fixture(scope="module")
def z3_results(tmp_path_factory):
    return run_distributed(_z3_worker, world_size=2, args=(str(tmp_path_factory.mktemp("hf_z3") / "run"),),
                           timeout=600)


@pytest.mark.slow
def test_zero3_trainer_step_is_sam_step(z3_results):
    for r in z3_results:  # RW-SAM (last_layer) over 2 steps of 2 micro-batches
        torch.testing.assert_close(r["trainer"], r["ref"], rtol=0, atol=1e-6)
    assert torch.equal(z3_results[0]["trainer"], z3_results[1]["trainer"])
    assert all("sam_ascent_norm" in e and "rwsam_weight_entropy" in e for e in z3_results[0]["logs"] if "loss" in e)


@pytest.mark.slow
def test_zero3_local_ascent_costs_the_plain_trainer_step(z3_results):
    counts, plain = z3_results[0]["counts"], z3_results[0]["plain_counts"]
    assert counts and counts == plain, (counts, plain)  # the ascent only re-uses ZeRO-3's own parameter gathers


@pytest.mark.slow
def test_zero3_resume_from_trainer_checkpoint_is_bit_equal(z3_results):
    for r in z3_results:
        assert len(r["resumed_batches"]) == 2
        assert all(torch.equal(a, b) for a, b in zip(r["resumed_batches"], r["batches"][2:]))
        assert torch.equal(r["resumed"], r["trainer"])
