"""dist_sam.deepspeed under ZeRO-3 and fp16, on real 2-process gloo groups (CPU, DS_ACCELERATOR=cpu).

One spawn runs every check. DeepSpeed's CPU accelerator reports fp16 unsupported unless the CPU has
AVX512-FP16 (``torch.ops.mkldnn._is_mkldnn_fp16_supported``), so the workers declare it supported:
the fp16 engines then run for real on the CPU (fp16 parameters and DeepSpeed's own fp16 optimizers
and loss scalers); only the device differs from a GPU (benchmarks/gpu/deepspeed_fp16.py).

* ZeRO-3, device-local ascent: two steps equal a float64 re-derivation of DDP local SAM and RW-SAM
  (``last_layer``, ``exact``) on the same per-rank batches, with persistent parameters, with
  ``stage3_max_reuse_distance`` default and 0; a SAM step adds only parameter all-gathers.
* fp16, ZeRO 0-3 (and bf16 under ZeRO-3): DeepSpeed 0.19.8's own ZeRO-0 fp16 backward leaves the
  loss unscaled (the "suspected mis-scaling"); ``rho = 0`` is DeepSpeed's own fp16 step bit for bit, loss-scale
  sequence and skipped steps included; a non-finite ascent or descent gradient on one rank skips
  the step on both and moves the scale as DeepSpeed's own step does; USAM tracks fp32 DDP.
"""

from __future__ import annotations

import math
import os
import warnings

import pytest

pytest.importorskip("deepspeed")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions",
                                                           "dist_sam_tests"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import dist_sam.deepspeed as dsd  # noqa: E402
from dist_utils import run_distributed  # noqa: E402
from reference import (make_batch, make_mlp, ref_ascent_grad, ref_descent_grad, ref_gibbs_weights,  # noqa: E402
                       ref_per_sample_grads, ref_perturbation)
from test_deepspeed import _count_collectives, _ddp_reference, _max_diff  # noqa: E402
import test_deepspeed  # noqa: E402

pytestmark = pytest.mark.slow
CE = nn.CrossEntropyLoss(reduction="none")
BASE = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
MICRO = 4
SAM = dict(variant="sam", rho=0.05)
# name -> (sam section, zero_optimization extras)
NONPERSISTENT = {"stage3_param_persistence_threshold": 0}
# released after each forward and re-gathered in the backward (no prefetch keeps them gathered)
RELEASED = dict(NONPERSISTENT, stage3_max_reuse_distance=0, stage3_prefetch_bucket_size=0)
ZERO3 = {
    "sam-persistent": (SAM, {}),
    "sam-reuse-default": (SAM, NONPERSISTENT),
    "sam-reuse0": (SAM, RELEASED),
    "usam-reuse0": (dict(variant="usam", rho=0.05), RELEASED),
    "rwsam-last_layer-reuse0": (dict(variant="rwsam", rho=0.05, lam=0.5, estimator="last_layer"),
                                RELEASED),
    "rwsam-exact": (dict(variant="rwsam", rho=0.05, lam=0.5, estimator="exact"), NONPERSISTENT),
    # fd's directions are dist-sam's generator: the reference is DDP sam_step (as in test_deepspeed)
    "rwsam-fd-reuse0": (test_deepspeed.RWSAM, RELEASED),
}
STEPS = 2


def _config(stage, sam, zero=None, fp16=None):
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
           "zero_optimization": dict({"stage": stage}, **(zero or {})), "zero_allow_untested_optimizer": True,
           "steps_per_print": 10**9, "sam": sam}
    if fp16 is not None:
        cfg["fp16"] = dict({"enabled": True}, **fp16)
    return cfg


def make_deep_mlp(seed=0):
    """Three linear layers: the middle one's weight enters the backward (dL/dh = W^T dL/dz), so
    a re-gathered parameter without e would change the descent gradient."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def _engine(config, loss_fn=CE, base=BASE, make=make_mlp):
    model = make(dtype=torch.float32) if make is make_mlp else make()
    engine, *_ = dsd.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), **base), config=config,
                                loss_fn=loss_fn)
    return engine


def _batch(step, rank, dtype=torch.float32):
    x, y = make_batch("mlp", MICRO, seed=1000 * step + rank, dtype=torch.float32)  # test_deepspeed's batches
    return x.to(dtype), y


# -- the float64 re-derivation of DDP local SAM / RW-SAM (SPEC.md §1, §3) ------------------------
def _ref_weights(model, x, y, sam):
    if sam["variant"] != "rwsam":
        return None
    params = list(model.parameters())
    if sam["estimator"] == "last_layer":
        params = list(model[-1].parameters())  # the final nn.Linear's per-sample gradient
    per_sample = ref_per_sample_grads(model, CE, x, y, params)
    s = [math.sqrt(sum((g ** 2).sum().item() for g in gi)) for gi in per_sample]
    return ref_gibbs_weights(s, sam["lam"], "zscore")


def _ref_local_sam(sam, steps, base=BASE, loss_fn=CE, make=make_mlp):
    model = (make(dtype=torch.float32) if make is make_mlp else make()).double()
    opt = torch.optim.SGD(model.parameters(), **base)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    for step in range(steps):
        x, y = _batch(step, rank, torch.float64)
        g, _ = ref_ascent_grad(model, loss_fn, x, y, _ref_weights(model, x, y, sam))
        variant = sam["variant"].replace("rwsam", "sam")  # RW-SAM perturbs like SAM from its weighted g
        e = ref_perturbation(g, [p.detach() for p in model.parameters()], variant=variant,
                             rho=sam["rho"])
        with torch.no_grad():
            saved = [p.clone() for p in model.parameters()]
            for p, ei in zip(model.parameters(), e):
                p.add_(ei)
        h = ref_descent_grad(model, loss_fn, x, y)
        with torch.no_grad():
            for p, s in zip(model.parameters(), saved):
                p.copy_(s)
        for p, hi in zip(model.parameters(), h):
            torch.distributed.all_reduce(hi)
            p.grad = hi / world
        opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def _full_state(engine):
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def _state(engine):
    """The whole weights (gathered under ZeRO-3)."""
    if engine.zero_optimization_stage() == 3:
        return _full_state(engine)
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def _bf16_zero3():
    """bf16 under ZeRO-3: rho = 0 is DeepSpeed's own bf16 step bit for bit; SAM tracks fp32."""
    rank = torch.distributed.get_rank()
    runs = {}
    for name, sam in (("rho0", dict(SAM, rho=0.0)), ("sam", SAM), ("plain", SAM)):
        cfg = _config(3, sam, NONPERSISTENT)
        cfg["bf16"] = {"enabled": True}
        engine = _engine(cfg)
        for step in range(3 if name == "sam" else 2):
            x, y = _batch(step, rank, torch.bfloat16)
            if name == "plain":
                engine.backward(CE(engine(x), y).mean())
                engine.step()
            else:
                engine.train_step((x, y))
        runs[name] = _state(engine)
    ref = _ref_local_sam(SAM, 3)
    finite = all(torch.isfinite(v).all() for v in runs["sam"].values())
    return dict(rho0=_max_diff(runs["rho0"], runs["plain"]), fp32=_max_diff(runs["sam"], ref), finite=finite)


def _rel_diff(a, b):
    return max(((a[k].double() - b[k].double()).norm() / b[k].double().norm()).item() for k in b)


def _zero3():
    out = {}
    rank = torch.distributed.get_rank()
    for name, (sam, zero) in ZERO3.items():
        fd = sam.get("estimator") == "fd"
        make = make_deep_mlp if "reuse" in name and not fd else make_mlp
        ref = _ddp_reference("mlp", sam, 1, 0.0, STEPS) if fd else _ref_local_sam(sam, STEPS, make=make)
        engine = _engine(_config(3, sam, zero), make=make)
        for step in range(STEPS):
            engine.train_step(_batch(step, rank))
        out[name] = dict(rel=_rel_diff(_full_state(engine), ref), released=engine._step_engine.zero3.released)
    return out


def _zero3_collectives():
    out = {}
    rank = torch.distributed.get_rank()
    for name, zero in (("reuse-default", NONPERSISTENT), ("reuse0", RELEASED)):
        engine = _engine(_config(3, SAM, zero))
        x, y = _batch(0, rank)
        for _ in range(2):  # warm-up: set-up traffic and the first trace stay out
            engine.train_step((x, y))
            engine.backward(CE(engine(x), y).mean())
            engine.step()
        test_deepspeed._COUNTS = {}
        engine.backward(CE(engine(x), y).mean())
        engine.step()
        plain, test_deepspeed._COUNTS = test_deepspeed._COUNTS, {}
        engine.train_step((x, y))
        sam, test_deepspeed._COUNTS = test_deepspeed._COUNTS, None
        param_bytes = sum(p.ds_numel * 4 for p in engine.module.parameters())
        out[name] = dict(plain=plain, sam=sam, param_bytes=param_bytes)
    return out


# -- fp16 ----------------------------------------------------------------------------------------
def _zero0_fp16_backward_scaling():
    """DeepSpeed's own ZeRO-0 fp16 backward: .grad / (unscaled gradient) and the loss scale."""
    engine = _engine(_config(0, SAM, fp16={}))
    x, y = _batch(0, torch.distributed.get_rank(), torch.float16)
    params = list(engine.module.parameters())
    g = torch.autograd.grad(CE(engine.module(x), y).float().mean(), params)
    for t in g:  # the engine's .grad is the mean over the ranks
        torch.distributed.all_reduce(t)
        t.div_(torch.distributed.get_world_size())
    engine.backward(CE(engine(x), y).float().mean())
    ratio = (sum((p.grad.double() ** 2).sum() for p in params).sqrt() / sum((t.double() ** 2).sum() for t in g).sqrt())
    return dict(ratio=ratio.item(), scale=float(engine.optimizer.loss_scale))


ZERO_EXTRAS = {0: {}, 1: {}, 2: {"overlap_comm": True}, 3: NONPERSISTENT}
FP16 = dict(initial_scale_power=8, loss_scale_window=2, hysteresis=1)  # the scale moves within a few steps


class _InfOnce:
    """Per-sample CE, with +inf on rank 1 at the ``call``-th call (0: SAM's ascent, 1: its descent)."""

    def __init__(self, call):
        self.call, self.calls = call, 0

    def __call__(self, outputs, targets):
        losses = CE(outputs, targets)
        if torch.distributed.get_rank() == 1 and self.calls == self.call:
            losses = losses * float("inf")  # inf * f_i: a non-finite gradient in this pass only
        self.calls += 1
        return losses


def _fp16_run(stage, sam, steps, plain=False, bad_step=None, bad_pass=None):
    """Weights, loss scales and skipped steps after each step; the plain run uses engine.backward."""
    loss_fn = CE if bad_pass is None else _InfOnce(2 * bad_step + bad_pass)
    engine = _engine(_config(stage, sam, ZERO_EXTRAS[stage], fp16=FP16), loss_fn)
    rank, scales = torch.distributed.get_rank(), []
    moved = []
    for step in range(steps):
        x, y = _batch(step, rank, torch.float16)
        if plain and bad_step == step and rank == 1:
            x = x.clone()
            x[0, 0] = float("inf")
        before = list(_state(engine).values())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if plain:
                loss = CE(engine(x), y).mean()
                engine.backward(loss.float() * engine.optimizer.loss_scale if stage == 0 else loss)  # PR 8393
                engine.step()
            else:
                engine.train_step((x, y))
        scales.append(float(engine.optimizer.loss_scale))
        moved.append(any(not torch.equal(a, p) for a, p in zip(before, _state(engine).values())))
    return dict(state=_state(engine), scales=scales,
                skipped=engine.skipped_steps, moved=moved)


TINY = 2.0 ** -24  # loss multiplier: an fp16 gradient of TINY * f underflows unless loss-scaled


def _tiny_ce(outputs, targets):
    return CE(outputs, targets) * TINY


def _fp16_tiny_loss():
    """USAM on TINY * f (rho and lr times 1/TINY: the same problem): the ascent must be loss-scaled."""
    sam, base = dict(variant="usam", rho=0.5 / TINY), dict(lr=0.1 / TINY, momentum=0.9)
    ref = _ref_local_sam(sam, 3, base=base, loss_fn=_tiny_ce)
    out = {}
    for stage in (0, 1, 2, 3):
        engine = _engine(_config(stage, sam, ZERO_EXTRAS[stage], fp16={"loss_scale": 2.0 ** 15}), loss_fn=_tiny_ce,
                         base=base)
        for step in range(3):
            engine.train_step(_batch(step, torch.distributed.get_rank(), torch.float16))
        out[stage] = _max_diff({k: v.double() for k, v in _state(engine).items()}, ref)
    return out


def _fp16():
    out = {}
    for stage in (0, 1, 2, 3):
        plain = _fp16_run(stage, SAM, 5, plain=True)
        rho0 = _fp16_run(stage, dict(SAM, rho=0.0), 5)
        plain_bad = _fp16_run(stage, SAM, 4, plain=True, bad_step=1, bad_pass=None)
        ascent_bad = _fp16_run(stage, SAM, 4, bad_step=1, bad_pass=0)
        descent_bad = _fp16_run(stage, SAM, 4, bad_step=1, bad_pass=1)
        usam = _fp16_run(stage, dict(variant="usam", rho=0.05), 3)
        ref = _ddp_reference("mlp", dict(variant="usam", rho=0.05), gas=1, clip=0.0, steps=3)
        out[stage] = dict(
            rho0_diff=_max_diff(rho0["state"], plain["state"]), rho0_scales=(rho0["scales"], plain["scales"]),
            rho0_skipped=(rho0["skipped"], plain["skipped"]),
            bad=dict(plain=(plain_bad["scales"], plain_bad["skipped"], plain_bad["moved"]),
                     ascent=(ascent_bad["scales"], ascent_bad["skipped"], ascent_bad["moved"]),
                     descent=(descent_bad["scales"], descent_bad["skipped"], descent_bad["moved"])),
            usam_diff=_max_diff(usam["state"], ref), usam_moved=usam["moved"])
    return out


def _worker(rank, world_size):
    os.environ["DS_ACCELERATOR"] = "cpu"
    _count_collectives()
    from deepspeed.accelerator import get_accelerator

    type(get_accelerator()).is_fp16_supported = lambda self: True  # fp16 on this CPU (see the module doc)
    test_deepspeed.MICRO = MICRO
    return dict(zero3=_zero3(), zero3_collectives=_zero3_collectives(),
                zero0_fp16=_zero0_fp16_backward_scaling(), fp16=_fp16(), fp16_tiny=_fp16_tiny_loss(),
                bf16_zero3=_bf16_zero3())


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, world_size=2, timeout=900)


# -- ZeRO-3 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(ZERO3))
def test_zero3_local_sam_equals_float64_ddp_local_sam(results, case):
    for rank_results in results:
        r = rank_results["zero3"][case]
        assert r["rel"] <= 1e-6, r
        if "reuse0" in case:  # released after the forward, re-gathered in the backward: e re-applied
            assert r["released"] > 0, r
        if "persistent" in case:
            assert r["released"] == 0, r


@pytest.mark.parametrize("case", ["reuse-default", "reuse0"])
def test_zero3_sam_step_adds_only_parameter_all_gathers(results, case):
    gathers = ("all_gather", "all_gather_into_tensor", "all_gather_coalesced")
    for rank_results in results:
        r = rank_results["zero3_collectives"][case]
        plain, sam = r["plain"], r["sam"]
        assert any(plain.get(op, [0])[0] for op in ("reduce_scatter", "reduce_scatter_tensor", "all_reduce")), r
        for op in set(plain) | set(sam):
            if op in gathers:
                assert sam.get(op, [0, 0])[1] >= plain.get(op, [0, 0])[1], (op, r)
            else:
                assert sam.get(op) == plain.get(op), (op, r)
        extra = sum(sam.get(op, [0, 0])[1] - plain.get(op, [0, 0])[1] for op in gathers)
        assert 0 < extra <= 2 * r["param_bytes"] * 2, r  # the ascent's forward and backward gathers at most


def test_zero3_bf16_rho_zero_is_deepspeeds_own_step_and_sam_tracks_fp32(results):
    for rank_results in results:
        r = rank_results["bf16_zero3"]
        assert r["rho0"] == 0.0 and r["finite"] and r["fp32"] < 2e-2, r


# -- fp16 ----------------------------------------------------------------------------------------
def test_deepspeed_0_19_8_zero0_fp16_backward_does_not_scale_the_loss(results):
    """The cause of the old refusal: DeepSpeed's, not dist-sam's (PR #8393); dist-sam pre-scales."""
    for rank_results in results:
        r = rank_results["zero0_fp16"]
        assert r["scale"] == 2.0 ** 16 and abs(r["ratio"] - 1.0) < 1e-2, r


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_fp16_rho_zero_is_deepspeeds_own_fp16_step(results, stage):
    for rank_results in results:
        r = rank_results["fp16"][stage]
        assert r["rho0_diff"] == 0.0, r
        assert r["rho0_scales"][0] == r["rho0_scales"][1] and r["rho0_skipped"][0] == r["rho0_skipped"][1], r
        assert len(set(r["rho0_scales"][0])) > 1, r  # the scale moved: the sequence is a real check


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("bad_pass", ["ascent", "descent"])
def test_fp16_nonfinite_on_one_rank_skips_like_deepspeed(results, stage, bad_pass):
    for rank_results in results:
        bad = rank_results["fp16"][stage]["bad"]
        scales, skipped, moved = bad[bad_pass]
        assert (scales, skipped) == bad["plain"][:2], bad
        assert skipped >= 1 and not moved[1] and moved[2], bad


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_fp16_usam_tracks_fp32_ddp(results, stage):
    """USAM's e = rho g is not scale-invariant: an ascent gradient left scaled would blow it up."""
    for rank_results in results:
        r = rank_results["fp16"][stage]
        assert all(r["usam_moved"]) and r["usam_diff"] < 2e-2, r


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_fp16_ascent_is_taken_under_the_loss_scale(results, stage):
    for rank_results in results:
        assert rank_results["fp16_tiny"][stage] < 5e-3, rank_results["fp16_tiny"]


# -- configuration ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sam, zero, field", [
    (dict(SAM, ascent="micro", micro_batch_size=2), {}, "sam.ascent"),
    (dict(variant="asam"), {}, "sam.variant"),
])
def test_zero3_refusals(sam, zero, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        dsd.check_config(_config(3, sam, zero))


def test_other_deepspeed_versions_are_refused(monkeypatch):
    import deepspeed

    monkeypatch.setattr(deepspeed, "__version__", "0.20.0")
    for config in (_config(3, SAM), _config(1, SAM, fp16={})):
        with pytest.raises(ValueError, match=r"0\.19\.8.*installed: 0\.20\.0"):
            dsd.check_config(config)


def test_gpu_check_dry_run_world_size_1(tmp_path):
    """benchmarks/gpu/deepspeed_fp16.py on CPU. World size 1 also covers ZeRO-3 gathered data
    that aliases the shard: an inf ascent would leave NaN in the weights if e were added in place."""
    import json
    import subprocess
    import sys

    from test_train_run import REPO, worker_env

    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu.deepspeed_fp16", "--dry-run", "--out",
                           str(tmp_path)], cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "deepspeed_fp16_gpu_check.json").read_text())
    assert result["ok"] and sorted(result["stages"]) == ["0", "1", "2", "3"], result
    for stage in result["stages"].values():
        assert stage["bad_skipped"][1] >= 1 and len(set(stage["bad_scales"][1])) > 1, stage
