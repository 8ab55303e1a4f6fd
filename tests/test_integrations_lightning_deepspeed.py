"""dist_sam.integrations.lightning under Lightning's DeepSpeed ZeRO-2 on CPU (DS_ACCELERATOR=cpu), 2 gloo processes.

Lightning 2.6.6 refuses a CPU accelerator under ``DeepSpeedStrategy``, so the run uses
``lightning_utils.CPUDeepSpeedStrategy(stage=2)``: the same strategy with that gate lifted. One
spawn runs every check; the tests assert on what it returned:

* SAM through the mixin (fp32, accumulation 2, clip 0.05) equals dist-sam's own ``sam_step`` on a
  plain DDP model, same weights and batches, to 1e-6 (rank 1: parameters; DeepSpeed, unlike DDP,
  never broadcasts BatchNorm statistics); replicas bit-equal;
* bf16-mixed (DeepSpeed's bf16: bf16 weights, fp32 master; the CNN without its BatchNorm, whose fp32
  buffers DeepSpeed leaves beside bf16 weights) equals ``dist_sam.deepspeed.initialize`` run by hand
  with the same config on the same batches, bit for bit;
* every collective of a SAM step (calls and bytes) equals Lightning's own plain manual-optimization
  step under the same strategy: the local ascent communicates nothing;
* a Lightning checkpoint (DeepSpeed's directory) resumed by a new Trainer continues bit-equal
  (rank 1's BatchNorm statistics aside: DeepSpeed checkpoints rank 0's module);
* Lightning itself refuses ``strategy="deepspeed_stage_2", accelerator="cpu"`` (one process).
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("deepspeed")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# as tests/test_deepspeed.py: one JIT build of DeepSpeed's CPU comm op, in a cache of our own
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions",
                                                           "dist_sam_tests"))

import torch  # noqa: E402

from dist_utils import CollectiveCounts, run_distributed  # noqa: E402
from lightning_utils import BASE, B, CPUDeepSpeedStrategy, Net, PlainNet, loader, rank_data, reference, state, \
    trainer  # noqa: E402

pytestmark = pytest.mark.slow
STEPS = 3
SAM = dict(rho=0.05)


def _zero2(**kwargs):
    return trainer(strategy=CPUDeepSpeedStrategy(stage=2), **kwargs)


def _without_bn(cnn):
    """DeepSpeed 0.19.8's bf16 casts parameters and keeps buffers fp32, which BatchNorm refuses on CPU."""
    cnn[1] = torch.nn.Identity()
    return cnn


def _by_hand(rank, steps, precision):
    """dist_sam.deepspeed.initialize on the same CNN, config and batches as Lightning's engine."""
    import dist_sam.deepspeed
    from lightning_utils import make_cnn, per_sample_ce

    model = _without_bn(make_cnn(0, dtype=torch.float32))
    config = {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
              "bf16": {"enabled": precision == "bf16-mixed"}, "sam": SAM}
    engine, *_ = dist_sam.deepspeed.initialize(model=model, config=config, loss_fn=per_sample_ce,
                                               optimizer=torch.optim.SGD(model.parameters(), **BASE))
    x, y = rank_data(rank, steps)
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    for i in range(steps):
        engine.train_step((x[i * B:(i + 1) * B].to(dtype), y[i * B:(i + 1) * B]))
    return state(engine.module)


def _worker(rank, world_size, tmp):
    os.environ["DS_ACCELERATOR"] = "cpu"
    counts = CollectiveCounts().install()  # before DeepSpeed binds any collective
    out = {}
    module = Net(count=counts, sam=SAM, accumulation_steps=2, clip_grad_norm=0.05)
    t = _zero2(max_steps=STEPS)
    t.fit(module, loader(rank, STEPS))
    ref, _ = reference(rank, STEPS, SAM, accumulation_steps=2, clip_grad_norm=0.05)
    out["fp32"] = dict(state=state(module.net), ref=ref, global_step=t.global_step,
                       num_steps=module.sam_optimizer.num_steps, counts=module.step_bytes)
    bf16 = Net(sam=SAM)
    _without_bn(bf16.net)
    _zero2(max_steps=STEPS, precision="bf16-mixed").fit(bf16, loader(rank, STEPS))
    out["bf16"] = dict(state=state(bf16.net), by_hand=_by_hand(rank, STEPS, "bf16-mixed"))
    plain = PlainNet(count=counts)
    _zero2(max_steps=STEPS).fit(plain, loader(rank, STEPS))
    out["plain_counts"] = plain.step_bytes
    out["resume"] = _resume(rank, tmp)
    return out


def _resume(rank, tmp):
    """As tests/test_integrations_lightning.py: 2 epochs uninterrupted vs 1 epoch, checkpoint, resume."""
    sam = dict(rho=0.05, interval=3)  # steps 0 and 3 are SAM steps: a lost counter shows
    whole = Net(sam=sam)
    _zero2(max_steps=-1, max_epochs=2).fit(whole, loader(rank, 2))
    first = Net(sam=sam)
    t = _zero2(max_steps=-1, max_epochs=1)
    t.fit(first, loader(rank, 2))
    path = os.path.join(tmp, "lightning_ds.ckpt")  # a directory: DeepSpeed's own checkpoint, sharded by ZeRO
    t.save_checkpoint(path)
    second = Net(sam=sam)
    t2 = _zero2(max_steps=-1, max_epochs=2)
    t2.fit(second, loader(rank, 2), ckpt_path=path)
    return dict(whole=state(whole.net), resumed=state(second.net), global_step=t2.global_step,
                num_steps=second.sam_optimizer.num_steps, loaded_sam=second.sam_at_start["sam"])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed(_worker, world_size=2, args=(str(tmp_path_factory.mktemp("pl_ds")),), timeout=900)


def _max_diff(a, b, keys):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in keys)


def test_zero2_mixin_equals_ddp_sam_step(results):
    for rank, r in enumerate(results):
        r = r["fp32"]
        assert r["state"].keys() == r["ref"].keys()
        # DDP broadcasts rank 0's BatchNorm statistics before each forward, DeepSpeed keeps each
        # rank's own: rank 0's agree, rank 1's parameters only
        keys = [k for k in r["state"] if rank == 0 or "running" not in k]
        print(f"ZeRO-2 fp32, rank {rank}: max diff {_max_diff(r['state'], r['ref'], keys):.1e} to DDP sam_step")
        assert _max_diff(r["state"], r["ref"], keys) <= 1e-6
        assert r["global_step"] == STEPS and r["num_steps"] == STEPS
    a, b = (r["fp32"]["state"] for r in results)
    assert all(torch.equal(a[k], b[k]) for k in a if "running" not in k)  # replicas bit-equal


def test_zero2_bf16_equals_the_deepspeed_adapter_by_hand(results):
    for r in results:
        s, h = r["bf16"]["state"], r["bf16"]["by_hand"]
        assert all(s[k].dtype == h[k].dtype for k in s) and any(v.dtype == torch.bfloat16 for v in s.values())
        assert all(torch.equal(s[k], h[k]) for k in s)


def test_zero2_local_ascent_costs_lightnings_plain_step(results):
    for r in results:
        sam, plain = r["fp32"]["counts"], r["plain_counts"]
        assert len(sam) == len(plain) == STEPS and plain[0]
        assert sam == plain, (sam, plain)


def test_zero2_resume_from_lightning_checkpoint_is_bit_equal(results):
    for rank, r in enumerate(results):
        r = r["resume"]
        # DeepSpeed saves the module (BatchNorm statistics included) from rank 0 only: rank 1
        # resumes with rank 0's statistics (training-mode forwards never read them)
        assert all(torch.equal(r["whole"][k], r["resumed"][k]) for k in r["whole"] if rank == 0 or "running" not in k)
        assert r["global_step"] == 4 and r["num_steps"] == 4 and r["loaded_sam"] == {"num_steps": 2}


def test_lightning_itself_refuses_deepspeed_on_cpu():
    """What the README says, and why the tests run CPUDeepSpeedStrategy: Lightning 2.6.6's own gate."""
    import lightning.pytorch as L

    t = L.Trainer(accelerator="cpu", devices=1, strategy="deepspeed_stage_2", max_steps=1, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    module = Net(sam=SAM)
    with pytest.raises(RuntimeError, match="only supported on CUDA GPUs"):
        t.fit(module, loader(0, 1))
    assert module._sam_runner is None  # before any step
