"""Diagnostics (SPEC.md §4) against brute force: SGN covariance trace, Hessian trace, per-sample norms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_sam.diagnostics import HessianTrace, hessian_trace, per_sample_grad_norms, sgn_covariance_trace
from dist_sam.distributed import CommCounter

from dist_utils import run_distributed
from reference import bn_buffers, make_batch, make_cnn, make_mlp, ref_per_sample_grads, ref_sgn_covariance_trace

CE = nn.CrossEntropyLoss(reduction="none")


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _exact_hessian_trace(model, x, y) -> float:
    """tr ∇²f_S by torch.autograd.functional.hessian over the flattened parameters."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(theta):
        chunks = theta.split([s.numel() for s in shapes])
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        return CE(torch.func.functional_call(model, params, (x,)), y).mean()

    return torch.autograd.functional.hessian(loss, flat).diagonal().sum().item()


@pytest.mark.parametrize("kind, train", [("mlp", True), ("cnn", True), ("cnn", False)])
def test_sgn_covariance_trace_equals_brute_force(kind, train):
    model = (make_mlp if kind == "mlp" else make_cnn)()
    model.train(train)
    batches = [make_batch(kind, 6, seed=s) for s in range(2)]
    before = bn_buffers(model)
    got = sgn_covariance_trace(model, CE, batches, chunk_size=4)
    for k, v in model.named_buffers():
        assert torch.equal(v, before[k]), k
    per_sample = [g for x, y in batches for g in ref_per_sample_grads(model, CE, x, y)]
    assert got == pytest.approx(ref_sgn_covariance_trace(per_sample), rel=1e-10)
    one = sgn_covariance_trace(model, CE, batches[0], chunk_size=6)  # a single (x, y) pair
    assert one == pytest.approx(ref_sgn_covariance_trace(ref_per_sample_grads(model, CE, *batches[0])), rel=1e-10)


def test_per_sample_grad_norms_equal_brute_force_and_respect_params():
    model = make_cnn()
    x, y = make_batch("cnn", 5)
    expected = [torch.sqrt(sum((g ** 2).sum() for g in gi)) for gi in ref_per_sample_grads(model, CE, x, y)]
    torch.testing.assert_close(per_sample_grad_norms(model, CE, (x, y), chunk_size=2), torch.stack(expected))
    head = list(model[4].parameters())
    only_head = [torch.sqrt(sum((g ** 2).sum() for g in gi)) for gi in ref_per_sample_grads(model, CE, x, y, head)]
    torch.testing.assert_close(per_sample_grad_norms(model, CE, [(x, y)], params=head), torch.stack(only_head))


def test_hessian_trace_within_three_standard_errors_of_exact():
    model = _tiny()
    x, y = torch.randn(10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)), torch.arange(10) % 3
    exact = _exact_hessian_trace(model, x, y)
    est = hessian_trace(model, CE, [(x[:4], y[:4]), (x[4:], y[4:])], num_probes=400, seed=1, chunk_size=3)
    assert isinstance(est, HessianTrace) and est.num_probes == 400 and 0 < est.stderr < 0.2 * abs(exact)
    assert abs(est.mean - exact) < 3 * est.stderr, (est, exact)
    again = hessian_trace(model, CE, (x, y), num_probes=400, seed=1)  # same probes, unchunked: same sums
    assert again.mean == pytest.approx(est.mean, rel=1e-10)


def test_hessian_trace_leaves_batchnorm_stats_and_rejects_bad_arguments():
    model = make_cnn()
    before = bn_buffers(model)
    est = hessian_trace(model, CE, make_batch("cnn", 6), num_probes=3)
    assert all(torch.equal(v, before[k]) for k, v in model.named_buffers())
    assert torch.isfinite(torch.tensor([est.mean, est.stderr])).all()
    assert math.isnan(hessian_trace(model, CE, make_batch("cnn", 6), num_probes=1).stderr)  # needs 2 probes
    with pytest.raises(ValueError, match="num_probes"):
        hessian_trace(model, CE, make_batch("cnn", 6), num_probes=0)
    with pytest.raises(ValueError, match="chunk_size"):
        sgn_covariance_trace(model, CE, make_batch("cnn", 6), chunk_size=0)


# -- aggregated across 2 real gloo ranks -----------------------------------------------------------
def _ddp_worker(rank, world):
    model = DDP(make_mlp())
    counter = CommCounter.attach(model)
    x, y = make_batch("mlp", 12, seed=9)
    mine = (x[rank * 6:(rank + 1) * 6], y[rank * 6:(rank + 1) * 6])
    out = dict(
        sgn=sgn_covariance_trace(model, CE, mine, chunk_size=4, all_reduce=True),
        hess=hessian_trace(model, CE, [mine], num_probes=5, seed=3, all_reduce=True),
        local=sgn_covariance_trace(model, CE, mine),
        norms=per_sample_grad_norms(model, CE, mine),
    )
    out["ddp_comm"] = counter.calls  # the diagnostics never run a DDP backward
    return out


@pytest.mark.slow
def test_all_reduce_aggregates_over_ranks_like_one_process_on_all_samples():
    r0, r1 = run_distributed(_ddp_worker, world_size=2)
    model = make_mlp()
    x, y = make_batch("mlp", 12, seed=9)
    whole = sgn_covariance_trace(model, CE, (x, y))
    assert r0["sgn"] == pytest.approx(whole, rel=1e-9) and r1["sgn"] == pytest.approx(whole, rel=1e-9)
    assert r0["local"] != pytest.approx(r1["local"])
    hess = hessian_trace(model, CE, (x, y), num_probes=5, seed=3)
    assert r0["hess"].mean == pytest.approx(hess.mean, rel=1e-9) and r0["hess"] == r1["hess"]
    torch.testing.assert_close(torch.cat([r0["norms"], r1["norms"]]), per_sample_grad_norms(model, CE, (x, y)))
    assert r0["ddp_comm"] == 0 and r1["ddp_comm"] == 0
