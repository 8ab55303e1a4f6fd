"""SAMTrainer under Accelerate's FSDP2 plugin (``fsdp=True, fsdp_config={"version": 2}``) equals dist-sam's own
``sam_step`` under DDP on the same batches; collectives as Trainer's plain FSDP2 step; resume.

Accelerate 1.16 turns its FSDP plugin on for accelerator devices only: ``AcceleratorState.__init__``
(accelerate/state.py:947-977) sets ``DistributedType.FSDP`` inside a branch taken for MULTI_GPU, MULTI_XPU, ...
and never for MULTI_CPU, so on CPU Trainer silently runs DDP (SAMTrainer refuses that, below). No setting avoids
it. To run the FSDP2 path on 2 gloo processes, :func:`_accelerate_fsdp_on_cpu` (test-only) takes that same branch
for MULTI_CPU: the statements accelerate runs on GPUs, nothing else. Everything after it is the real code:
Accelerate's ``fully_shard`` wrapping (``fsdp2_prepare_model``), its ``no_sync`` (``set_requires_gradient_sync``),
clipping and FSDP2 checkpointing, Trainer's loop and SAMTrainer's step on dist-sam's FSDP2 engine.
"""

from __future__ import annotations

import os

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch  # noqa: E402

from dist_sam.config import SamConfig  # noqa: E402
from dist_sam.integrations.hf import SAMTrainer  # noqa: E402
from dist_utils import CollectiveCounts, run_distributed  # noqa: E402
from test_integrations_hf import (SGD_ARGS, StepCollectives, Tokens, make_args, recording, reference,  # noqa: E402
                                 tiny_distilbert)

_COUNTER = CollectiveCounts()  # installed once per worker process, before the engines bind any collective


def _accelerate_fsdp_on_cpu() -> None:
    """Test-only: Accelerate's FSDP branch (accelerate/state.py:971-977, and :998, which keeps PartialState's
    distributed type the same: every later ``AcceleratorState()`` copies it back), taken for MULTI_CPU as for GPUs."""
    import accelerate.state
    from accelerate.utils import DistributedType

    init = accelerate.state.AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            accelerate.state.PartialState._shared_state["distributed_type"] = self.distributed_type

    accelerate.state.AcceleratorState.__init__ = patched


def fsdp_args(reshard_after_forward: bool) -> dict:
    return dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["TransformerBlock"],
                                        "state_dict_type": "SHARDED_STATE_DICT",
                                        "reshard_after_forward": reshard_after_forward})


def full(model) -> torch.Tensor:
    """The whole model, gathered from the shards (in ``parameters()`` order, as :func:`flat`)."""
    return torch.cat([p.full_tensor().detach().reshape(-1) for p in model.parameters()])


def _run(cls, out, init, *, raf=False, resume=None, max_steps=3, train_args=SGD_ARGS, **kwargs):
    model = tiny_distilbert()
    model.load_state_dict(init)
    counting = StepCollectives(_COUNTER)
    # SGD: AdamW's first steps (lr * g / (|g| + eps) where g ~ 0) magnify the last-bit difference between
    # FSDP2's reduce-scatter and DDP's all-reduce (1.2e-7 after 2 plain steps, 1.4e-3 after 3 RW-SAM steps)
    args = make_args(out, save_strategy="steps", save_steps=2, max_steps=max_steps, **fsdp_args(raf),
                     **dict(train_args))
    trainer = recording(cls)(model=model, args=args, train_dataset=Tokens(), callbacks=[counting], **kwargs)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, counting.counts


def _fsdp_worker(rank: int, world_size: int, out: str) -> dict:
    _accelerate_fsdp_on_cpu()
    _COUNTER.install()
    init = tiny_distilbert().state_dict()
    rwsam = SamConfig(variant="rwsam", rho=0.05, lam=0.5, estimator="fd", mu=1e-3)
    run, counts = _run(SAMTrainer, out, init, sam=rwsam)
    ref, _, _ = reference(init, run.batches, rwsam, k=2, ddp=True, sgd=True)
    resumed, _ = _run(SAMTrainer, out + "_r", init, resume=os.path.join(out, "checkpoint-2"), sam=rwsam)
    _, plain_counts = _run(transformers.Trainer, out + "_plain", init)
    sam = SamConfig(variant="sam", rho=0.05)  # FSDP2's default reshard-after-forward, one step
    run_raf, raf_counts = _run(SAMTrainer, out + "_raf", init, raf=True, max_steps=1, sam=sam)
    ref_raf, _, _ = reference(init, run_raf.batches, sam, k=2, ddp=True, sgd=True)
    _, plain_raf_counts = _run(transformers.Trainer, out + "_plain_raf", init, raf=True, max_steps=1)
    skipped = _nonfinite_run(out + "_nan", init)
    units = sum(isinstance(m, torch.distributed.fsdp.FSDPModule) for m in run.model.modules())
    return dict(trainer=full(run.model), ref=ref, units=units, skipped=skipped, resumed=full(resumed.model), sharded=type(run.model).__name__,
                counts=counts, plain_counts=plain_counts, raf=full(run_raf.model), ref_raf=ref_raf,
                raf_counts=raf_counts, plain_raf_counts=plain_raf_counts, logs=run.state.log_history,
                batches=[b["input_ids"] for b in run.batches],
                resumed_batches=[b["input_ids"] for b in resumed.batches])


def _nonfinite_run(out, init) -> dict:
    """Rank 0's first ascent loss is NaN: the poisoned descent reduce-scatters NaN into every shard on every
    rank, Trainer's gradient norm is NaN, and SAMTrainer drops the step (weights untouched, step counted)."""
    import warnings

    calls = []

    def poisoned(outputs, labels):
        calls.append(1)
        losses = torch.nn.functional.cross_entropy(outputs.logits, labels, reduction="none")
        first = len(calls) == 1 and torch.distributed.get_rank() == 0
        return losses * float("nan") if first else losses

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run, _ = _run(SAMTrainer, out, init, max_steps=1, sam=SamConfig(), per_sample_loss=poisoned)
    model = tiny_distilbert()
    model.load_state_dict(init)
    return dict(weights=full(run.model), init=torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
                num_steps=run._sam.num_steps, warned=any("non-finite gradient" in str(w.message) for w in caught))


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    return run_distributed(_fsdp_worker, world_size=2, args=(str(tmp_path_factory.mktemp("hf_fsdp") / "run"),),
                           timeout=600)


@pytest.mark.slow
def test_fsdp2_trainer_step_is_sam_step(fsdp_results):
    for r in fsdp_results:  # RW-SAM (fd) over 3 steps; SAM over 1 with reshard-after-forward on; 2 micro-batches
        assert r["sharded"].startswith("FSDP")  # Accelerate's fully_shard class: FSDP2 did run
        torch.testing.assert_close(r["trainer"], r["ref"], rtol=0, atol=1e-6)
        torch.testing.assert_close(r["raf"], r["ref_raf"], rtol=0, atol=1e-6)
    assert not torch.equal(fsdp_results[0]["batches"][0], fsdp_results[1]["batches"][0])  # each rank its own shard
    assert torch.equal(fsdp_results[0]["trainer"], fsdp_results[1]["trainer"])
    assert all("sam_ascent_norm" in e and "rwsam_weight_entropy" in e for e in fsdp_results[0]["logs"] if "loss" in e)


@pytest.mark.slow
def test_fsdp2_local_ascent_costs_the_plain_trainer_step(fsdp_results):
    r = fsdp_results[0]
    params = sum(p.numel() for p in tiny_distilbert().parameters())
    # reshard-after-forward off: one all-gather per unit per micro-batch, one reduce-scatter per unit per step
    assert r["counts"] and r["counts"] == r["plain_counts"], (r["counts"], r["plain_counts"])
    # one reduction per window (Trainer's no_sync on the first micro-batch): each unit once per step
    assert r["units"] == 4 and r["counts"]["reduce_scatter_single"][0] == 3 * r["units"]
    assert r["counts"]["reduce_scatter_single"][1] >= 3 * params * 4  # every gradient (padded) once per step
    # on (FSDP2's default): the plain step re-gathers in its backward; SAM's ascent keeps the units gathered
    sam, plain = r["raf_counts"], r["plain_raf_counts"]
    assert sam["reduce_scatter_single"] == plain["reduce_scatter_single"]
    assert sam["all_gather_single"][0] < plain["all_gather_single"][0], (sam, plain)
    assert {k: v for k, v in sam.items() if k != "all_gather_single"} == \
        {k: v for k, v in plain.items() if k != "all_gather_single"}


@pytest.mark.slow
def test_fsdp2_resume_from_trainer_checkpoint_is_bit_equal(fsdp_results):
    for r in fsdp_results:
        assert len(r["resumed_batches"]) == 2  # step 3's micro-batches, as the first run saw them
        assert all(torch.equal(a, b) for a, b in zip(r["resumed_batches"], r["batches"][4:]))
        assert torch.equal(r["resumed"], r["trainer"])


def _cpu_worker(rank: int, world_size: int, out: str) -> str:
    with pytest.raises(ValueError, match="MULTI_CPU") as err:
        SAMTrainer(model=tiny_distilbert(), args=make_args(out, **fsdp_args(True)), train_dataset=Tokens(),
                   sam=SamConfig())
    return str(err.value)


@pytest.mark.slow
def test_fsdp_without_accelerate_fsdp_is_refused(tmp_path):
    """Without the shim Accelerate leaves FSDP off on CPU (Trainer would run DDP): SAMTrainer says so."""
    messages = run_distributed(_cpu_worker, world_size=2, args=(str(tmp_path / "cpu"),), timeout=300)
    assert all("accelerate/state.py" in m for m in messages)


@pytest.mark.slow
def test_fsdp2_nonfinite_gradient_skips_the_step(fsdp_results):
    for r in fsdp_results:
        skipped = r["skipped"]
        assert skipped["warned"] and skipped["num_steps"] == 1
        assert torch.equal(skipped["weights"], skipped["init"])
