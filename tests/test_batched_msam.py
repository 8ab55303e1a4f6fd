"""Batched m-SAM (``sam_step(..., ascent="micro", micro_impl="vmap")``, dist_sam.optim.batched).

The vmapped passes must give the sequential m-SAM step: against the float64 reference of
SPEC.md §2 written in tests/reference.py (parameters and BatchNorm buffers, several steps with
momentum), against the loop path itself, and on 2 gloo processes under DDP. Combinations that
cannot be exact are refused with a ValueError before any work.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dist_sam
from dist_sam import create_optimizer, sam_step

from dist_utils import run_distributed
from reference import make_batch, make_cnn, make_mlp, ref_base_step, ref_msam_grad

CE = nn.CrossEntropyLoss(reduction="none")
VARIANTS = {
    "sam": ("sam", dict(rho=0.05), dict(variant="sam", rho=0.05)),
    "usam": ("usam", dict(rho=0.05), dict(variant="usam", rho=0.05)),
    "asam": ("asam", dict(rho=0.5, eta=0.01), dict(variant="asam", rho=0.5, eta=0.01)),
}
SGD = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("m", [2, 4])
def test_vmap_matches_float64_reference(variant, kind, m):
    name, kw, ref_kw = VARIANTS[variant]
    make = make_mlp if kind == "mlp" else make_cnn
    model, ref = make(), make()
    opt = create_optimizer(name, model.parameters(), base="sgd", **kw, **SGD)
    ref_opt = torch.optim.SGD(ref.parameters(), **SGD)
    for step in range(3):
        x, y = make_batch(kind, 8, seed=step)
        loss = sam_step(model, opt, CE, x, y, ascent="micro", micro_batch_size=m, micro_impl="vmap")
        if kind == "mlp":  # the mean loss at w (returned in float32, as by the loop)
            torch.testing.assert_close(loss, CE(ref(x), y).mean().detach().float(), rtol=1e-6, atol=1e-7)
        ref_base_step(ref, ref_opt, ref_msam_grad(ref, CE, x, y, m=m, **ref_kw))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10)
    for (k, v), (_, r) in zip(model.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(v, r, rtol=0, atol=1e-10, msg=k)


def test_vmap_matches_the_loop_in_float32_with_param_groups():
    model, loop_model = make_cnn(dtype=torch.float32), make_cnn(dtype=torch.float32)
    groups = lambda mod: [{"params": list(mod[0].parameters()) + list(mod[1].parameters()), "rho": 0.1},  # noqa: E731
                          {"params": list(mod[4].parameters()), "rho": 0.02}]
    opt = create_optimizer("sam", groups(model), base="sgd", **SGD)
    loop_opt = create_optimizer("sam", groups(loop_model), base="sgd", **SGD)
    for step in range(3):
        x, y = make_batch("cnn", 12, seed=step, dtype=torch.float32)
        a = sam_step(model, opt, CE, x, y, ascent="micro", micro_batch_size=3, micro_impl="vmap")
        b = sam_step(loop_model, loop_opt, CE, x, y, ascent="micro", micro_batch_size=3)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for (k, p), q in zip(model.state_dict().items(), loop_model.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=k)


def test_vmap_non_finite_ascent_skips_the_step():
    model = make_mlp()
    opt = create_optimizer("sam", model.parameters(), base="sgd", rho=0.05, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = make_batch("mlp", 8)
    x[5] = float("inf")  # the second micro-batch of 4
    with pytest.warns(UserWarning, match="non-finite"):
        sam_step(model, opt, CE, x, y, ascent="micro", micro_batch_size=4, micro_impl="vmap")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_vmap_refusals_name_the_problem():
    x, y = make_batch("mlp", 8)
    model = make_mlp()
    sam = create_optimizer("sam", model.parameters(), base="sgd", lr=0.1)
    with pytest.raises(ValueError, match="micro_impl must be one of"):
        sam_step(model, sam, CE, x, y, ascent="micro", micro_batch_size=4, micro_impl="batched")
    with pytest.raises(ValueError, match="ascent='local'"):
        sam_step(model, sam, CE, x, y, micro_impl="vmap")
    with pytest.raises(ValueError, match="GradScaler"):
        sam_step(model, sam, CE, x, y, ascent="micro", micro_batch_size=4, micro_impl="vmap",
                 scaler=torch.amp.GradScaler("cpu"))
    rw = create_optimizer("rwsam", model.parameters(), base="sgd", lr=0.1, lam=0.5, estimator="fd", mu=1e-3)
    with pytest.raises(ValueError, match="RWSAM with lam=0.5"):
        sam_step(model, rw, CE, x, y, ascent="micro", micro_batch_size=4, micro_impl="vmap")
    dropout = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.1), nn.Linear(16, 4)).double()
    with pytest.raises(ValueError, match="dropout"):
        sam_step(dropout, create_optimizer("sam", dropout.parameters(), base="sgd", lr=0.1), CE, x, y,
                 ascent="micro", micro_batch_size=4, micro_impl="vmap")
    cnn = make_cnn()
    cnn[1].momentum = None
    xc, yc = make_batch("cnn", 8)
    with pytest.raises(ValueError, match="momentum=None"):
        sam_step(cnn, create_optimizer("sam", cnn.parameters(), base="sgd", lr=0.1), CE, xc, yc,
                 ascent="micro", micro_batch_size=4, micro_impl="vmap")
    assert all(p.grad is None for p in model.parameters()), "refused before any work"


def test_rwsam_lam_zero_is_sam_and_batches():
    model, ref = make_mlp(), make_mlp()
    rw = create_optimizer("rwsam", model.parameters(), base="sgd", lam=0.0, rho=0.05, **SGD)
    ref_opt = torch.optim.SGD(ref.parameters(), **SGD)
    x, y = make_batch("mlp", 8)
    sam_step(model, rw, CE, x, y, ascent="micro", micro_batch_size=2, micro_impl="vmap")
    ref_base_step(ref, ref_opt, ref_msam_grad(ref, CE, x, y, m=2, variant="sam", rho=0.05))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10)


def _ddp_worker(rank, world_size):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dist_sam.distributed.ddp import CommCounter

    out = {}
    for impl in ("loop", "vmap"):
        module = make_cnn()
        model = DDP(module)
        comm = CommCounter.attach(model)
        opt = create_optimizer("sam", module.parameters(), base="sgd", rho=0.05, **SGD)
        for step in range(2):
            x, y = make_batch("cnn", 8, seed=10 * step + rank)
            sam_step(model, opt, CE, x, y, ascent="micro", micro_batch_size=2, micro_impl=impl)
        out[impl] = dict(state={k: v.clone() for k, v in module.state_dict().items()}, calls=comm.calls, bytes=comm.bytes)
    return out


@pytest.mark.slow
def test_vmap_under_ddp_matches_the_loop():
    results = run_distributed(_ddp_worker, world_size=2)
    for r in results:
        for k, v in r["loop"]["state"].items():
            torch.testing.assert_close(r["vmap"]["state"][k], v, rtol=0, atol=1e-10, msg=k)
        # one all-reduce per step beside DDP's reducer, counted by the same counter, the same bytes
        assert r["vmap"]["calls"] == 2 and r["vmap"]["bytes"] == r["loop"]["bytes"] > 0, (r["vmap"], r["loop"])
    for k, v in results[0]["vmap"]["state"].items():  # replicas agree: the gradients were all-reduced
        if "running" not in k and "num_batches" not in k:  # BN statistics are each rank's own, as in the loop
            assert torch.equal(v, results[1]["vmap"]["state"][k]), k
