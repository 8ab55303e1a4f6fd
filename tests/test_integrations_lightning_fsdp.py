"""dist_sam.integrations.lightning under FSDP2: Lightning's ``ModelParallelStrategy(data_parallel_size=2)``
on CPU, 2 gloo processes (Lightning's ``strategy="fsdp"`` is FSDP1 and GPU-only: refused by Lightning).

One spawn runs every check; the tests assert on what it returned:

* SAM through the mixin (fp32 with accumulation 2 and clip 0.05; bf16-mixed) equals dist-sam's FSDP2
  engine run by hand (``sam_step`` on the CNN under ``fully_shard``), parameters and buffers, and
  the parameters equal ``sam_step`` under plain DDP, to 1e-6; replicas bit-equal;
* a SAM step reduce-scatters exactly what Lightning's own plain manual-optimization step does under
  the same strategy, and all-gathers no more;
* a Lightning checkpoint (a distributed-checkpoint directory) resumed by a new Trainer continues
  bit-equal (parameters; BatchNorm statistics: one rank's copy is checkpointed);
* tensor parallelism (the strategy's default on one node) is refused with a ValueError before training;
  Lightning itself refuses ``strategy="fsdp", accelerator="cpu"``.
"""

from __future__ import annotations

import os

import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from dist_sam import sam_step
from dist_sam.config import SamConfig
from dist_utils import CollectiveCounts, run_distributed
from lightning_utils import BASE, B, Net, PlainNet, loader, per_sample_ce, rank_data, reference, trainer
from reference import make_cnn

pytestmark = pytest.mark.slow
STEPS = 3
SAM = dict(rho=0.05)
# name -> (precision, accumulation_steps, clip_grad_norm)
CASES = {"fp32-accum2-clip": ("32-true", 2, 0.05), "bf16-mixed": ("bf16-mixed", 1, None), "fp32": ("32-true", 1, None)}
DTYPES = {"32-true": None, "bf16-mixed": torch.bfloat16}


def _fsdp2(**kwargs):
    return trainer(strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), **kwargs)


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Whole parameters (gathered from their shards: a collective) and this rank's buffers."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in module.state_dict().items()}


def _by_hand(rank, steps, accumulation_steps, clip_grad_norm, dtype):
    """dist-sam's FSDP2 engine: sam_step on the CNN sharded as one fully_shard unit, same batches."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = fully_shard(make_cnn(0, dtype=torch.float32), mesh=init_device_mesh("cpu", (2,)))
    config = SamConfig.from_dict(SAM)
    opt = config.build_optimizer(model.parameters(), base="sgd", **BASE)
    x, y = rank_data(rank, steps)
    for i in range(steps):
        sl = slice(i * B, (i + 1) * B)
        sam_step(model, opt, per_sample_ce, x[sl], y[sl], accumulation_steps=accumulation_steps,
                 clip_grad_norm=clip_grad_norm, autocast_dtype=dtype, **config.step_kwargs())
    return full_state(model)


def _worker(rank, world_size, tmp):
    counts = CollectiveCounts().install()
    out = {"cases": {}}
    for name, (precision, k, clip) in CASES.items():
        module = Net(count=counts, sam=SAM, accumulation_steps=k, clip_grad_norm=clip)
        t = _fsdp2(max_steps=STEPS, precision=precision)
        t.fit(module, loader(rank, STEPS))
        out["cases"][name] = dict(
            state=full_state(module.net), by_hand=_by_hand(rank, STEPS, k, clip, DTYPES[precision]),
            ddp=reference(rank, STEPS, SAM, accumulation_steps=k, clip_grad_norm=clip, dtype=DTYPES[precision])[0],
            counts=module.step_bytes, global_step=t.global_step, num_steps=module.sam_optimizer.num_steps)
    plain = PlainNet(count=counts)
    _fsdp2(max_steps=STEPS).fit(plain, loader(rank, STEPS))
    out["plain_counts"] = plain.step_bytes
    out["resume"] = _resume(rank, tmp)
    try:
        trainer(strategy=ModelParallelStrategy(), max_steps=1).fit(Net(sam=SAM), loader(rank, 1))
    except ValueError as err:
        out["tensor_parallel_error"] = str(err)
    return out


def _resume(rank, tmp):
    """As tests/test_integrations_lightning.py: 2 epochs uninterrupted vs 1 epoch, checkpoint, resume."""
    sam = dict(rho=0.05, interval=3)  # steps 0 and 3 are SAM steps: a lost counter shows
    whole = Net(sam=sam)
    _fsdp2(max_steps=-1, max_epochs=2).fit(whole, loader(rank, 2))
    first = Net(sam=sam)
    t = _fsdp2(max_steps=-1, max_epochs=1)
    t.fit(first, loader(rank, 2))
    path = os.path.join(tmp, "lightning_fsdp2.ckpt")  # a directory: one shard file per rank
    t.save_checkpoint(path)
    second = Net(sam=sam)
    t2 = _fsdp2(max_steps=-1, max_epochs=2)
    t2.fit(second, loader(rank, 2), ckpt_path=path)
    return dict(whole=full_state(whole.net), resumed=full_state(second.net), global_step=t2.global_step,
                num_steps=second.sam_optimizer.num_steps, loaded_sam=second.sam_at_start["sam"])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed(_worker, world_size=2, args=(str(tmp_path_factory.mktemp("pl_fsdp")),), timeout=600)


def _max_diff(a, b, keys):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in keys)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fsdp2_mixin_equals_the_fsdp2_engine_and_ddp_sam_step(results, case):
    for r in results:
        r = r["cases"][case]
        assert r["state"].keys() == r["by_hand"].keys() == r["ddp"].keys()
        by_hand = _max_diff(r["state"], r["by_hand"], r["state"])
        # DDP broadcasts rank 0's BatchNorm statistics, FSDP2 keeps each rank's own: parameters only
        ddp = _max_diff(r["state"], r["ddp"], [k for k in r["state"] if "running" not in k])
        print(f"{case}: max diff {by_hand:.1e} to the FSDP2 engine by hand, {ddp:.1e} to DDP sam_step")
        assert by_hand <= 1e-6 and ddp <= 1e-6, case
        assert r["global_step"] == STEPS and r["num_steps"] == STEPS
    a, b = (r["cases"][case]["state"] for r in results)
    assert all(torch.equal(a[k], b[k]) for k in a if "running" not in k)  # replicas bit-equal


def _kind(counts, kind):
    """(calls, bytes) of one kind of collective in a step's counts."""
    entries = [v for name, v in counts.items() if kind in name]
    return sum(v[0] for v in entries), sum(v[1] for v in entries)


def test_fsdp2_local_ascent_reduces_as_lightnings_plain_step(results):
    for r in results:
        sam, plain = r["cases"]["fp32"]["counts"], r["plain_counts"]
        assert len(sam) == len(plain) == STEPS
        for s, p in zip(sam, plain):
            assert _kind(p, "reduce_scatter")[0] >= 1
            assert _kind(s, "reduce_scatter") == _kind(p, "reduce_scatter"), (s, p)
            assert _kind(s, "all_gather")[1] <= _kind(p, "all_gather")[1], (s, p)


def test_fsdp2_resume_from_lightning_checkpoint_is_bit_equal(results):
    for r in results:
        r = r["resume"]
        assert all(torch.equal(r["whole"][k], r["resumed"][k]) for k in r["whole"] if "running" not in k)
        assert r["global_step"] == 4 and r["num_steps"] == 4 and r["loaded_sam"] == {"num_steps": 2}
    # BatchNorm statistics are per rank under FSDP2 (unsharded buffers, never synced), and the
    # distributed checkpoint stores one copy of a tensor every rank holds under the same key: one
    # rank resumes its own statistics, the other that copy (training-mode forwards never read them)
    buffers = [all(torch.equal(r["resume"]["whole"][k], r["resume"]["resumed"][k]) for k in r["resume"]["whole"]
                   if "running" in k) for r in results]
    assert sorted(buffers) == [False, True]


def test_tensor_parallel_is_refused_before_training(results):
    for r in results:
        assert "tensor_parallel_size" in r.get("tensor_parallel_error", ""), r.get("tensor_parallel_error")


def test_lightning_itself_refuses_fsdp_on_cpu():
    """What the README says: Lightning's strategy="fsdp" (FSDP1) wants a CUDA accelerator (Trainer(...))."""
    import lightning.pytorch as L

    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        L.Trainer(accelerator="cpu", devices=2, strategy="fsdp")
