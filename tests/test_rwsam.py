"""RW-SAM (SPEC.md §3): weights, estimators, one step against a float64 reference, DDP at 2 ranks."""

from __future__ import annotations

import copy
import itertools
import logging

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import dist_sam
from dist_sam import RWSAM, SAM, create_optimizer, sam_step
from dist_sam.distributed import CommCounter
from dist_sam.optim.calibration import MU_CANDIDATES
from dist_sam.optim.estimators import direction_seed, exact_norms, fd_norms, rademacher_directions
from dist_sam.optim.rwsam import gibbs_weights

from dist_utils import run_distributed
from reference import (bn_buffers, make_batch, make_cnn, make_mlp, ref_base_step, ref_fd_estimates,
                       ref_gibbs_weights, ref_msam_grad, ref_per_sample_grads)

CE = nn.CrossEntropyLoss(reduction="none")


def _named(model):
    return dict(model.named_parameters())


def _ref_norms(model, x, y, params=None):
    return torch.stack([torch.sqrt(sum((g ** 2).sum() for g in gi))
                        for gi in ref_per_sample_grads(model, CE, x, y, params)])


# -- lam = 0 is SAM ------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["fd", "last_layer"])
@pytest.mark.parametrize("micro", [False, True])
def test_lam_zero_is_sam_bit_for_bit(estimator, micro):
    model, plain = make_cnn(dtype=torch.float32), make_cnn(dtype=torch.float32)
    opt = create_optimizer("rwsam", model.parameters(), lr=0.1, momentum=0.9, lam=0.0, estimator=estimator)
    ref = create_optimizer("sam", plain.parameters(), lr=0.1, momentum=0.9)
    kw = dict(ascent="micro", micro_batch_size=4) if micro else {}
    for step in range(3):
        x, y = make_batch("cnn", 8, seed=step, dtype=torch.float32)
        sam_step(model, opt, CE, x, y, **kw)
        sam_step(plain, ref, CE, x, y, **kw)
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p, q)
    for v, r in zip(model.buffers(), plain.buffers()):
        assert torch.equal(v, r)
    assert opt.last_weights is None and opt.mu is None  # the estimator never ran


# -- the weights -------------------------------------------------------------------------------
@pytest.mark.parametrize("normalization", ["zscore", "mean", "none"])
@pytest.mark.parametrize("lam", [0.0, 0.25, 0.5, 2.0])
def test_gibbs_weights_follow_spec_and_sum_to_b(normalization, lam):
    s = torch.rand(16, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3
    a = gibbs_weights(s, lam, normalization)
    torch.testing.assert_close(a, ref_gibbs_weights(s, lam, normalization), rtol=1e-12, atol=1e-12)
    assert a.sum().item() == pytest.approx(16.0, abs=1e-12)
    if lam == 0:
        assert torch.equal(a, torch.ones(16, dtype=torch.float64))


def test_gibbs_weights_are_stable_for_large_lam():
    s = torch.tensor([1e3, 2e3, 5e3], dtype=torch.float32)
    a = gibbs_weights(s, 50.0, "none")  # exp(2.5e5) would overflow without the max-shift
    assert torch.isfinite(a).all() and a[2].item() == pytest.approx(3.0)
    assert torch.equal(gibbs_weights(torch.tensor([2.0]), 0.5, "zscore"), torch.ones(1))  # b = 1


def test_weights_of_a_step_sum_to_b_and_favour_large_norms():
    model = make_mlp()
    opt = create_optimizer("rwsam", model.parameters(), lr=0.1, estimator="exact", lam=1.0)
    x, y = make_batch("mlp", 12)
    norms = _ref_norms(copy.deepcopy(model), x, y)
    sam_step(model, opt, CE, x, y)
    torch.testing.assert_close(opt.last_estimates, norms, rtol=1e-10, atol=1e-12)
    assert opt.last_weights.sum().item() == pytest.approx(12.0)
    assert torch.equal(opt.last_weights.argsort(), norms.argsort())


# -- estimators --------------------------------------------------------------------------------
def test_fd_is_unbiased_over_20000_directions():
    model = make_mlp()
    x, y = make_batch("mlp", 8)
    with torch.no_grad():
        losses = CE(model(x), y)
    s = fd_norms(model, CE, x, y, losses, _named(model), 1e-4, seed=7, num_directions=20_000, chunk_size=2_000)
    exact_sq = _ref_norms(model, x, y) ** 2
    rel = (s ** 2 - exact_sq).abs() / exact_sq
    assert rel.max().item() < 0.05, rel


def test_fd_chunked_equals_one_direction_at_a_time():
    model = make_cnn()
    x, y = make_batch("cnn", 6)
    with torch.no_grad(), dist_sam.frozen_running_stats(model):
        losses = CE(model(x), y)
    one = fd_norms(model, CE, x, y, losses, _named(model), 1e-5, seed=3, num_directions=5)
    chunked = fd_norms(model, CE, x, y, losses, _named(model), 1e-5, seed=3, num_directions=5, chunk_size=2)
    torch.testing.assert_close(one, chunked, rtol=1e-9, atol=1e-12)
    dirs = list(rademacher_directions(list(model.parameters()), 3, 5))
    torch.testing.assert_close(one, ref_fd_estimates(model, CE, x, y, dirs, 1e-5), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind, train", [("mlp", True), ("cnn", True), ("cnn", False)])
def test_exact_equals_per_sample_autograd_loop(kind, train):
    model = (make_mlp if kind == "mlp" else make_cnn)()
    model.train(train)
    x, y = make_batch(kind, 7)
    before = bn_buffers(model)
    got = exact_norms(model, CE, x, y, _named(model), chunk_size=3)
    for k, v in model.named_buffers():
        assert torch.equal(v, before[k]), k
    torch.testing.assert_close(got, _ref_norms(model, x, y), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind, ce", [("mlp", CE), ("cnn", CE),
                                      ("mlp", nn.CrossEntropyLoss(reduction="none", label_smoothing=0.1))])
def test_last_layer_equals_brute_force_final_layer_norm(kind, ce):
    model = (make_mlp if kind == "mlp" else make_cnn)()
    final = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    x, y = make_batch(kind, 8)
    twin = copy.deepcopy(model)
    twin_final = [m for m in twin.modules() if isinstance(m, nn.Linear)][-1]
    expected = torch.stack([torch.sqrt(sum((g ** 2).sum() for g in gi))
                            for gi in ref_per_sample_grads(twin, ce, x, y, twin_final.parameters())])
    opt = create_optimizer("rwsam", model.parameters(), lr=0.1, estimator="last_layer")
    sam_step(model, opt, ce, x, y)
    torch.testing.assert_close(opt.last_estimates, expected, rtol=1e-10, atol=1e-12)
    assert final.weight.grad is None  # the hook captured and the step finished cleanly


# -- one step against the float64 reference ------------------------------------------------------
def _ref_weight_fn(seed, step, K, mu, lam, normalization):
    groups = itertools.count()

    def weights(model, x, y):
        v = list(rademacher_directions(list(model.parameters()), direction_seed(seed, step, 0, next(groups)), K))
        return ref_gibbs_weights(ref_fd_estimates(model, CE, x, y, v, mu), lam, normalization)

    return weights


CASES = [  # (variant, SAM kwargs, reference kwargs, kind, normalization, micro, K)
    ("sam", {}, dict(variant="sam", rho=0.05), "mlp", "zscore", False, 1),
    ("sam", {}, dict(variant="sam", rho=0.05), "cnn", "zscore", True, 1),
    ("usam", dict(normalize=False), dict(variant="usam", rho=0.05), "mlp", "mean", True, 2),
    ("usam", dict(normalize=False), dict(variant="usam", rho=0.05), "cnn", "none", False, 1),
    ("asam", dict(adaptive=True, eta=0.01), dict(variant="asam", rho=0.05, eta=0.01), "cnn", "mean", False, 3),
    ("asam", dict(adaptive=True, eta=0.0), dict(variant="asam", rho=0.05, eta=0.0), "mlp", "zscore", True, 1),
]


@pytest.mark.parametrize("variant, kw, ref_kw, kind, normalization, micro, K", CASES, ids=[f"{c[0]}-{c[3]}-{c[4]}-micro{c[5]}-K{c[6]}" for c in CASES])
def test_step_matches_float64_reference(variant, kw, ref_kw, kind, normalization, micro, K):
    make = make_mlp if kind == "mlp" else make_cnn
    model, ref = make(), make()
    mu, lam, seed, b = 1e-5, 0.5, 11, 8
    opt = RWSAM(model.parameters(), torch.optim.SGD, rho=0.05, lam=lam, mu=mu, num_directions=K,
                normalization=normalization, seed=seed, lr=0.1, momentum=0.9, weight_decay=5e-4, **kw)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    m = b // 2 if micro else b
    for step in range(3):
        x, y = make_batch(kind, b, seed=step)
        sam_step(model, opt, CE, x, y, ascent="micro" if micro else "local", micro_batch_size=m if micro else None)
        h = ref_msam_grad(ref, CE, x, y, m=m, weight_fn=_ref_weight_fn(seed, step, K, mu, lam, normalization), **ref_kw)
        ref_base_step(ref, ref_opt, h)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10)
    for (k, v), r in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(v, r, rtol=0, atol=1e-10, msg=k)


# -- the extra forward: weights, BN, RNG, precision ------------------------------------------------
def test_fd_leaves_weights_bn_and_rng_untouched():
    model = make_cnn(dtype=torch.float32)
    opt = create_optimizer("rwsam", model.parameters(), lr=0.1, mu=1e-3, num_directions=3)
    x, y = make_batch("cnn", 8, dtype=torch.float32)
    with opt.ascent_context(model):
        out = model(x)
    weights, buffers = [p.detach().clone() for p in model.parameters()], bn_buffers(model)
    rng = torch.get_rng_state()
    losses = CE(out, y)
    opt.ascent_loss(losses, outputs=out, module=model, loss_fn=CE, inputs=x, targets=y, rank=0, step=0).backward()
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p, w)
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    assert torch.equal(torch.get_rng_state(), rng)


def test_directions_are_seeded_per_step_rank_and_group():
    model = make_mlp()
    x, y = make_batch("mlp", 8)
    losses = CE(model(x), y).detach()

    def weights(**ctx):
        opt = create_optimizer("rwsam", model.parameters(), lr=0.1, mu=1e-5, seed=ctx.pop("seed", 0))
        opt.ascent_loss(losses, module=model, loss_fn=CE, inputs=x, targets=y, **ctx)
        return opt.last_weights

    base = weights(rank=0, step=0, group=0)
    assert torch.equal(base, weights(rank=0, step=0, group=0))
    for other in (dict(rank=1, step=0, group=0), dict(rank=0, step=1, group=0), dict(rank=0, step=0, group=1),
                  dict(rank=0, step=0, group=0, seed=5)):
        assert not torch.allclose(base, weights(**other)), other
    seeds = {direction_seed(s, t, r, g) for s, t, r, g in itertools.product(range(3), repeat=4)}
    assert len(seeds) == 81


def test_fd_under_bf16_autocast_sees_the_perturbation():
    model = make_cnn(dtype=torch.float32)
    opt = create_optimizer("rwsam", model.parameters(), lr=0.1, mu=1e-2)
    sam_step(model, opt, CE, *make_batch("cnn", 8, dtype=torch.float32), autocast_dtype=torch.bfloat16)
    s = opt.last_estimates
    assert torch.isfinite(s).all() and (s > 0).all() and s.std() > 0


@pytest.mark.parametrize("estimator", ["fd", "exact"])
def test_estimators_replay_the_ascent_dropout_masks(estimator):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Dropout(0.5), nn.Linear(32, 4)).double()
    x, y = make_batch("mlp", 8)
    seed, mu = 4, 1e-7
    twin = copy.deepcopy(model)
    torch.manual_seed(123)
    sam_step(twin, create_optimizer("sam", twin.parameters(), lr=0.0), CE, x, y)
    after_sam = torch.get_rng_state()
    opt = create_optimizer("rwsam", model.parameters(), lr=0.0, mu=mu, seed=seed, estimator=estimator)
    torch.manual_seed(123)  # the step's ascent forward is the first draw: the reference replays it
    sam_step(model, opt, CE, x, y)
    assert torch.equal(torch.get_rng_state(), after_sam)  # the estimator drew nothing from the global stream
    torch.manual_seed(123)
    grads = ref_per_sample_grads(model, CE, x, y)
    if estimator == "fd":
        (v,) = rademacher_directions(list(model.parameters()), direction_seed(seed, 0, 0, 0), 1)
        expected = torch.stack([sum((g * vi.double()).sum() for g, vi in zip(gi, v)).abs() for gi in grads])
    else:
        expected = torch.stack([torch.sqrt(sum((g ** 2).sum() for g in gi)) for gi in grads])
    torch.testing.assert_close(opt.last_estimates, expected, rtol=1e-4, atol=1e-5)  # fd: O(mu) truncation


def test_non_finite_estimates_fall_back_to_uniform_weights(monkeypatch):
    model = make_mlp()
    opt = create_optimizer("rwsam", model.parameters(), lr=0.1, mu=1e-3)
    monkeypatch.setattr(opt, "_estimate", lambda losses, ctx: torch.tensor([1.0, float("inf"), 2.0, 3.0]))
    losses = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=torch.float64)
    assert torch.equal(opt.ascent_loss(losses), losses.mean()) and torch.equal(opt.last_weights, torch.ones(4))


# -- mu = "auto" -------------------------------------------------------------------------------
def test_mu_auto_calibrates_once_deterministically_logs_and_resumes(caplog):
    def run(steps, load=None):
        model = make_mlp(dtype=torch.float32)
        opt = create_optimizer("rwsam", model.parameters(), lr=0.1)
        if load is not None:
            opt.load_state_dict(load)
        for step in range(steps):
            sam_step(model, opt, CE, *make_batch("mlp", 16, seed=step, dtype=torch.float32))
        return opt

    with caplog.at_level(logging.INFO, logger="dist_sam"):
        a, b = run(2), run(1)
    assert a.mu in MU_CANDIDATES and a.mu == b.mu and a.calibration == b.calibration
    assert a.calibration.error == min(a.calibration.errors.values())
    logs = [r.getMessage() for r in caplog.records if "mu='auto'" in r.getMessage()]
    assert len(logs) == 2 and f"mu={a.mu:g}" in logs[0]
    saved = a.state_dict()
    assert saved["rwsam"] == {"mu": a.mu}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dist_sam"):
        resumed = run(1, load=torch.load(_roundtrip(saved), weights_only=True))
    assert resumed.mu == a.mu and resumed.calibration is None and not caplog.records
    fixed = create_optimizer("rwsam", make_mlp().parameters(), lr=0.1, mu=1e-3)
    fixed.load_state_dict(saved)
    assert fixed.mu == 1e-3


def _roundtrip(obj):
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


# -- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    (dict(lam=-0.1), "lam"), (dict(mu=0.0), "mu"), (dict(mu=-1e-3), "mu"), (dict(mu="fast"), "mu"),
    (dict(num_directions=0), "num_directions"), (dict(num_directions=1.5), "num_directions"),
    (dict(estimator="adjoint"), "estimator"), (dict(normalization="softmax"), "normalization"),
    (dict(rho=-1.0), "rho"), (dict(seed="a"), "seed"),
])
def test_bad_options_raise_naming_the_option(kwargs, field):
    with pytest.raises(ValueError, match=field):
        create_optimizer("rwsam", make_mlp().parameters(), lr=0.1, **kwargs)


def test_last_layer_ignored_with_fd_warns():
    with pytest.warns(UserWarning, match="last_layer"):
        create_optimizer("rwsam", make_mlp().parameters(), lr=0.1, last_layer="2")


class _NoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 6)

    def forward(self, x):
        return self.conv(x.unsqueeze(1)).flatten(1)


@pytest.mark.parametrize("build, loss_fn, kwargs, match", [
    (lambda: _NoLinear().double(), CE, {}, "has none"),
    (make_mlp, lambda o, t: ((o - 1) ** 2).mean(1), {}, "cross-entropy"),
    (make_mlp, nn.CrossEntropyLoss(reduction="none", weight=torch.ones(4, dtype=torch.float64)), {}, "cross-entropy"),
    (make_mlp, CE, dict(last_layer="1"), "must be an nn.Linear"),
    (make_mlp, CE, dict(last_layer="head"), "names no submodule"),
    (lambda: nn.Sequential(*make_mlp(), nn.Tanh()).double(), CE, {}, "does not produce"),
])
def test_last_layer_setups_it_cannot_handle_say_why(build, loss_fn, kwargs, match):
    model = build()
    opt = create_optimizer("rwsam", model.parameters(), lr=0.1, estimator="last_layer", **kwargs)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        sam_step(model, opt, loss_fn, *make_batch("mlp", 8))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), before)) and not opt.is_perturbed


def test_named_last_layer_and_exports():
    model = make_mlp()
    opt = create_optimizer("rwsam", model.parameters(), lr=0.1, estimator="last_layer", last_layer="2")
    sam_step(model, opt, CE, *make_batch("mlp", 8))
    assert isinstance(opt, RWSAM) and isinstance(opt, SAM) and dist_sam.RWSAM is RWSAM
    assert "rwsam" in dist_sam.list_optimizers() and "lam=0.5" in repr(opt)
    with pytest.warns(UserWarning, match="closure"):
        opt.step(lambda: CE(model(make_batch("mlp", 8)[0]), make_batch("mlp", 8)[1]).mean().backward())


# -- data parallel, 2 real gloo processes ----------------------------------------------------------
def _ddp_worker(rank, world):
    out = {}
    model = DDP(make_cnn(dtype=torch.float32))
    counter = CommCounter.attach(model)
    x, y = make_batch("cnn", 8, seed=50 + rank, dtype=torch.float32)
    CE(model(x), y).mean().backward()  # one SGD step's gradient all-reduce
    out["sgd"] = (counter.calls, counter.bytes)
    for name, kind, ascent, estimator in [("fd", "cnn", "local", "fd"), ("last_layer", "cnn", "local", "last_layer"),
                                          ("micro", "cnn", "micro", "fd"), ("global", "cnn", "global", "fd")]:
        model = DDP((make_cnn if kind == "cnn" else make_mlp)(dtype=torch.float32))
        counter = CommCounter.attach(model)
        opt = create_optimizer("rwsam", model.parameters(), lr=0.1, momentum=0.9, estimator=estimator)
        comm, weights = [], []
        for step in range(2):
            x, y = make_batch("cnn", 8, seed=100 * step + rank, dtype=torch.float32)
            counter.reset()
            sam_step(model, opt, CE, x, y, ascent=ascent, micro_batch_size=4 if ascent == "micro" else None)
            comm.append((counter.calls, counter.bytes))
            weights.append(opt.last_weights.clone())
        out[name] = dict(comm=comm, a=weights, params=[p.detach().clone() for p in model.module.parameters()])
    return out


@pytest.mark.slow
def test_ddp_two_ranks_local_weights_no_extra_communication_params_in_sync():
    r0, r1 = run_distributed(_ddp_worker, world_size=2)
    sgd = r0["sgd"]
    for name in ("fd", "last_layer", "micro", "global"):
        expected = [(2 * sgd[0], 2 * sgd[1])] * 2 if name == "global" else [sgd] * 2  # global: + the ascent's
        assert r0[name]["comm"] == expected and r1[name]["comm"] == expected, name
        for a0, a1 in zip(r0[name]["a"], r1[name]["a"]):
            assert not torch.allclose(a0, a1), name  # each rank weights its own batch
            assert a0.sum().item() == pytest.approx(a0.numel(), rel=1e-5)
        for p, q in zip(r0[name]["params"], r1[name]["params"]):
            assert torch.equal(p, q), name
