"""dist_sam.deepspeed on real 2-process gloo groups (CPU, DS_ACCELERATOR=cpu).

One spawn runs every distributed check (DeepSpeed's import and engine set-up dominate the cost);
the tests below assert on what it returned:

* ZeRO 0, 1, 2 (fp32) x SAM, RW-SAM: three steps equal DDP ``sam_step`` from the same weights and
  data (also with gradient accumulation, clipping and m-SAM micro-batches);
* bf16 under ZeRO 0, 1, 2 stays finite, and ``rho = 0`` reproduces DeepSpeed's own bf16 step bit for bit;
* a SAM step makes exactly the collectives (calls and bytes) of a plain engine step;
* save, load, continue equals an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed's CPU accelerator JIT-builds a small comm op (~30 s, once). A cache of our own keeps
# other jobs that build it with other flags from forcing a rebuild on every run.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions",
                                                           "dist_sam_tests"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import dist_sam.deepspeed as dsd  # noqa: E402
from dist_utils import run_distributed  # noqa: E402
from reference import make_batch, make_cnn, make_mlp  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[1]
CE = nn.CrossEntropyLoss(reduction="none")
BASE = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
RWSAM = dict(variant="rwsam", rho=0.05, lam=0.5, estimator="fd", mu=1e-3)
SAM = dict(variant="sam", rho=0.05)
# name -> (stage, model, sam section, zero extras, gradient_accumulation_steps, gradient_clipping)
EQUIVALENCE = {
    "zero0-sam": (0, "cnn", SAM, {}, 1, 0.0),
    "zero1-sam-overlap": (1, "cnn", SAM, {"overlap_comm": True}, 1, 0.0),
    "zero2-sam-overlap": (2, "cnn", SAM, {"overlap_comm": True}, 1, 0.0),
    "zero0-rwsam": (0, "mlp", RWSAM, {}, 1, 0.0),
    "zero1-rwsam": (1, "mlp", RWSAM, {}, 1, 0.0),
    "zero2-rwsam-overlap": (2, "mlp", RWSAM, {"overlap_comm": True}, 1, 0.0),
    "zero1-asam-interval2": (1, "cnn", dict(variant="asam", rho=0.5, interval=2), {"overlap_comm": True}, 1, 0.0),
    "zero2-sam-global": (2, "mlp", dict(SAM, ascent="global"), {}, 1, 0.0),
    "zero0-sam-gas2-clip": (0, "mlp", SAM, {}, 2, 0.05),
    "zero2-rwsam-gas2-clip-micro": (2, "mlp", dict(RWSAM, ascent="micro", micro_batch_size=2), {}, 2, 0.05),
}
MICRO = 4  # samples per rank per micro-batch


# -- the distributed worker ----------------------------------------------------------------------
_COUNTS: dict | None = None  # name -> [calls, bytes] while counting


def _count_collectives() -> None:
    """Wrap the torch.distributed collectives DeepSpeed calls (before it binds any of them)."""
    import torch.distributed as dist

    def nbytes(value):
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, (list, tuple)):
            return sum(nbytes(v) for v in value)
        return 0

    for name in ("all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_tensor",
                 "all_gather", "all_gather_into_tensor", "all_gather_coalesced", "broadcast", "all_to_all",
                 "all_to_all_single", "gather", "scatter"):
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        def wrapper(*args, _fn=fn, _name=name, **kwargs):
            if _COUNTS is not None:
                entry = _COUNTS.setdefault(_name, [0, 0])
                entry[0] += 1
                entry[1] += nbytes(list(args) + list(kwargs.values()))
            return _fn(*args, **kwargs)

        setattr(dist, name, wrapper)


def _ds_config(stage, sam, zero=None, gas=1, clip=0.0, bf16=False):
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": gas, "gradient_clipping": clip,
            "zero_optimization": dict({"stage": stage}, **(zero or {})), "bf16": {"enabled": bf16},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "sam": sam}


def _engine(model, config):
    opt = torch.optim.SGD(model.parameters(), **BASE)
    engine, *_ = dsd.initialize(model=model, optimizer=opt, config=config, loss_fn=CE)
    return engine


def _batch(kind, step, rank, n, dtype=torch.float32):
    return make_batch(kind, n, seed=1000 * step + rank, dtype=dtype)


def _ddp_reference(kind, sam, gas, clip, steps):
    from torch.nn.parallel import DistributedDataParallel as DDP

    import dist_sam

    # DeepSpeed leaves BatchNorm buffers per rank; DDP would broadcast rank 0's at every forward
    model = DDP((make_cnn if kind == "cnn" else make_mlp)(dtype=torch.float32), broadcast_buffers=False)
    sam = dict(sam)
    variant, ascent, m = sam.pop("variant"), sam.pop("ascent", "local"), sam.pop("micro_batch_size", None)
    opt = dist_sam.create_optimizer(variant, model.parameters(), base="sgd", **sam, **BASE)
    rank = torch.distributed.get_rank()
    for step in range(steps):
        x, y = _batch(kind, step, rank, MICRO * gas)
        dist_sam.sam_step(model, opt, CE, x, y, ascent=ascent, micro_batch_size=m, accumulation_steps=gas,
                          clip_grad_norm=clip or None)
    return model.module.state_dict()


def _run_ds(engine, kind, gas, steps, dtype=torch.float32):
    rank = torch.distributed.get_rank()
    losses = []
    for step in range(steps):
        x, y = _batch(kind, step, rank, MICRO * gas)
        for xc, yc in zip(x.chunk(gas), y.chunk(gas)):
            losses.append(float(engine.train_step((xc.to(dtype), yc))))
    return losses


def _max_diff(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _equivalence():
    out = {}
    for name, (stage, kind, sam, zero, gas, clip) in EQUIVALENCE.items():
        ref = _ddp_reference(kind, sam, gas, clip, steps=3)
        engine = _engine((make_cnn if kind == "cnn" else make_mlp)(dtype=torch.float32),
                         _ds_config(stage, sam, zero, gas, clip))
        _run_ds(engine, kind, gas, steps=3)
        out[name] = _max_diff(engine.module.state_dict(), ref)
    return out


def _bf16():
    out = {}
    ref = _ddp_reference("mlp", SAM, gas=1, clip=0.0, steps=3)  # fp32
    for stage in (0, 1, 2):
        zero = {"overlap_comm": True} if stage == 2 else {}
        rwsam = _engine(make_mlp(dtype=torch.float32), _ds_config(stage, RWSAM, zero, bf16=True))
        losses = _run_ds(rwsam, "mlp", 1, steps=3, dtype=torch.bfloat16)
        finite = all(map(math.isfinite, losses)) and all(p.isfinite().all() for p in rwsam.module.parameters())
        sam = _engine(make_mlp(dtype=torch.float32), _ds_config(stage, SAM, zero, bf16=True))
        _run_ds(sam, "mlp", 1, steps=3, dtype=torch.bfloat16)
        # rho = 0: SAM must be DeepSpeed's own bf16 step, bit for bit (exact restore, no side effects)
        sam0 = _engine(make_mlp(dtype=torch.float32), _ds_config(stage, dict(SAM, rho=0.0), zero, bf16=True))
        _run_ds(sam0, "mlp", 1, steps=2, dtype=torch.bfloat16)
        plain = _engine(make_mlp(dtype=torch.float32), _ds_config(stage, SAM, zero, bf16=True))
        for step in range(2):
            x, y = _batch("mlp", step, torch.distributed.get_rank(), MICRO)
            plain.backward(CE(plain(x.to(torch.bfloat16)), y).mean())
            plain.step()
        out[stage] = dict(losses=losses, finite=finite, fp32_diff=_max_diff(sam.module.state_dict(), ref),
                          rho0_diff=_max_diff(sam0.module.state_dict(), plain.module.state_dict()))
    return out


def _collectives():
    global _COUNTS
    out = {}
    rank = torch.distributed.get_rank()
    for stage, zero in ((0, {}), (1, {}), (1, {"overlap_comm": True}), (2, {}), (2, {"overlap_comm": True})):
        engine = _engine(make_mlp(dtype=torch.float32), _ds_config(stage, RWSAM, zero))
        x, y = _batch("mlp", 0, rank, MICRO)
        engine.backward(CE(engine(x), y).mean())  # warm-up: one-time set-up traffic stays out
        engine.step()
        _COUNTS = {}
        engine.backward(CE(engine(x), y).mean())
        engine.step()
        plain, _COUNTS = _COUNTS, {}
        engine.train_step((x, y))
        sam, _COUNTS = _COUNTS, None
        grad_bytes = sum(p.numel() * 4 for p in engine.module.parameters())
        out[f"zero{stage}" + ("-overlap" if zero else "")] = dict(plain=plain, sam=sam, grad_bytes=grad_bytes)
    return out


def _resume(ckpt_dir):
    out = {}
    sam = dict(variant="rwsam", rho=0.05, mu="auto", interval=2)
    for stage in (0, 2):
        cfg = _ds_config(stage, sam)
        straight = _engine(make_mlp(dtype=torch.float32), cfg)
        _run_ds(straight, "mlp", 1, steps=5)
        first = _engine(make_mlp(dtype=torch.float32), cfg)
        _run_ds(first, "mlp", 1, steps=3)
        first.save_checkpoint(f"{ckpt_dir}/zero{stage}", tag="step3")
        resumed = _engine(make_mlp(seed=7, dtype=torch.float32), cfg)  # other weights: the load must matter
        _, client = resumed.load_checkpoint(f"{ckpt_dir}/zero{stage}", tag="step3")
        for step in range(3, 5):
            x, y = _batch("mlp", step, torch.distributed.get_rank(), MICRO)
            resumed.train_step((x, y))
        out[stage] = dict(diff=_max_diff(resumed.module.state_dict(), straight.module.state_dict()),
                          num_steps=resumed.sam.num_steps, mu=(resumed.sam.mu, straight.sam.mu),
                          client_keys=sorted(client))
    return out


def _nonfinite():
    """fp32: an inf input on rank 1 only skips the step on both ranks; the next good step applies."""
    import warnings

    out = {}
    rank = torch.distributed.get_rank()
    for stage in (0, 2):
        engine = _engine(make_mlp(dtype=torch.float32), _ds_config(stage, SAM))
        x, y = _batch("mlp", 0, rank, MICRO)
        before = {k: v.clone() for k, v in engine.module.state_dict().items()}
        bad = x.clone()
        if rank == 1:
            bad[0, 0] = float("inf")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine.train_step((bad, y))
        untouched = _max_diff(engine.module.state_dict(), before)
        engine.train_step((x, y))
        finite = all(torch.isfinite(v).all() for v in engine.module.state_dict().values())
        out[stage] = dict(untouched=untouched, moved=_max_diff(engine.module.state_dict(), before), finite=finite,
                          skipped=engine.skipped_steps)
    return out


def _worker(rank, world_size, ckpt_dir):
    os.environ["DS_ACCELERATOR"] = "cpu"
    _count_collectives()
    return dict(equivalence=_equivalence(), bf16=_bf16(), collectives=_collectives(), resume=_resume(ckpt_dir),
                nonfinite=_nonfinite())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed(_worker, world_size=2, args=(str(tmp_path_factory.mktemp("ds_ckpt")),), timeout=600)


# -- the distributed properties ------------------------------------------------------------------
@pytest.mark.parametrize("stage", [0, 2])
def test_fp32_nonfinite_on_one_rank_skips_the_step_on_every_rank(results, stage):
    for rank_results in results:
        r = rank_results["nonfinite"][stage]
        assert r["untouched"] == 0.0 and r["finite"] and r["moved"] > 0, r
        assert r["skipped"] == 1, r


@pytest.mark.parametrize("case", list(EQUIVALENCE))
def test_local_sam_and_rwsam_equal_ddp(results, case):
    for rank_results in results:
        assert rank_results["equivalence"][case] <= 1e-6, rank_results["equivalence"]


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_bf16_stays_finite_and_rho_zero_is_deepspeeds_own_step(results, stage):
    for rank_results in results:
        bf16 = rank_results["bf16"][stage]
        assert bf16["finite"], bf16
        assert bf16["fp32_diff"] < 2e-2, bf16  # bf16 SAM tracks the fp32 DDP result
        assert bf16["rho0_diff"] == 0.0, bf16


@pytest.mark.parametrize("case", ["zero0", "zero1", "zero1-overlap", "zero2", "zero2-overlap"])
def test_ascent_adds_no_gradient_reduction(results, case):
    for rank_results in results:
        counts = rank_results["collectives"][case]
        # the counter sees the gradient reduction itself (gloo reduces with all_reduce at every stage)
        assert counts["plain"]["all_reduce"][1] >= counts["grad_bytes"], counts
        assert counts["sam"] == counts["plain"], counts


@pytest.mark.parametrize("stage", [0, 2])
def test_save_load_continue_equals_uninterrupted(results, stage):
    for rank_results in results:
        resume = rank_results["resume"][stage]
        assert resume["diff"] == 0.0, resume
        assert resume["num_steps"] == 5 and resume["mu"][0] == resume["mu"][1] is not None, resume
        assert dsd.CLIENT_STATE_KEY not in resume["client_keys"]


# -- configuration errors, raised before any engine exists ---------------------------------------
def _config(**sam):
    return {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}, "sam": sam}


@pytest.mark.parametrize("config, field", [
    (_config(rho=0.05, foo=1), "sam.foo"),
    (_config(rho=-0.1), "sam.rho"),
    (_config(variant="lookahead"), "sam.variant"),
    (_config(ascent="micro", micro_batch_size=3), "sam.micro_batch_size"),
    (_config(ascent="micro"), "sam.micro_batch_size"),
    (_config(ascent="full"), "sam.ascent"),
    (dict(_config(), zero_optimization={"stage": 4}), "zero_optimization.stage"),
    (dict(_config(), amp={"enabled": True}), "amp"),
    (dict(_config(), torch_autocast={"enabled": True, "dtype": "fp16"}), "fp16"),
    ({"train_micro_batch_size_per_gpu": 8}, '"sam"'),
])
def test_invalid_config_raises_before_training(config, field):
    model = make_mlp(dtype=torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        dsd.initialize(model=model, config=config, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_sam_optimizer_is_refused_as_the_deepspeed_optimizer():
    import dist_sam

    model = make_mlp(dtype=torch.float32)
    opt = dist_sam.create_optimizer("sam", model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="plain base optimizer"):
        dsd.initialize(model=model, config=_config(), optimizer=opt)


@pytest.mark.parametrize("path", sorted((ROOT / "launch" / "configs").glob("ds_zero*.json")), ids=lambda p: p.name)
def test_launch_configs_validate(path):
    config = json.loads(path.read_text())
    sam = dsd.check_config(config, world_size=8)
    assert sam.variant in ("sam", "rwsam")


def test_import_dist_sam_does_not_import_deepspeed():
    code = "import sys, dist_sam, dist_sam.config; assert 'deepspeed' not in sys.modules, 'imported deepspeed'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_config_is_read_from_a_path_or_args_deepspeed_config(tmp_path):
    import argparse

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(_config(rho=-1.0)))
    model = make_mlp(dtype=torch.float32)
    for kwargs in (dict(config=str(path)), dict(args=argparse.Namespace(deepspeed_config=str(path)))):
        with pytest.raises(ValueError, match=r"sam\.rho"):
            dsd.initialize(model=model, **kwargs)
