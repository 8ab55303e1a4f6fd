"""LookSAM and look-m-SAM on one process: a float64 re-derivation from the issue's formulas,
``step(closure)``, resume bit-equal, and the refusals.

The reference below is written from the formulas alone (issue 22, point 1), not from dist_sam:

    look step (t % k == 0): g = grad at w (m-SAM: mean of the micro-batch gradients), g_s = SAM's
        descent gradient, g_v = g_s - (<g_s, g> / ||g||^2) g, update with g_s
    off step: update with g + alpha * (||g|| / ||g_v||) * g_v
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import dist_sam
from reference import make_batch, make_mlp

LOSS = nn.CrossEntropyLoss(reduction="none")


def _grad(model, x, y):
    return [g.detach() for g in torch.autograd.grad(LOSS(model(x), y).mean(), list(model.parameters()))]


def _norm(vs):
    return torch.sqrt(sum((v.double() ** 2).sum() for v in vs))


def _dot(a, b):
    return sum((u.double() * v.double()).sum() for u, v in zip(a, b))


def ref_look_grads(model, x, y, rho, m):
    """(g, g_s) at the model's weights: m-SAM over micro-batches of ``m`` (``m = b``: SAM)."""
    params = list(model.parameters())
    c = x.shape[0] // m
    g = [torch.zeros_like(p) for p in params]
    g_s = [torch.zeros_like(p) for p in params]
    for j in range(c):
        xj, yj = x[j * m:(j + 1) * m], y[j * m:(j + 1) * m]
        gj = _grad(model, xj, yj)
        n = _norm(gj)
        with torch.no_grad():
            w = [p.clone() for p in params]
            for p, t in zip(params, gj):
                p.add_(rho * t / (n + 1e-12))
        hj = _grad(model, xj, yj)
        with torch.no_grad():
            for p, t in zip(params, w):
                p.copy_(t)
        g = [a + t / c for a, t in zip(g, gj)]
        g_s = [a + t / c for a, t in zip(g_s, hj)]
    return g, g_s


def ref_looksam(model, batches, *, rho, k, alpha, lr, momentum, m=None, warmup=0, gather=None):
    """Weights after LookSAM steps on ``batches`` with SGD(momentum), every quantity in float64.

    ``gather(g) -> mean over ranks`` makes it data-parallel (each rank's batch in ``batches[t]``
    is a list of per-rank batches); ``None``: one process.
    """
    model = copy.deepcopy(model)
    params = list(model.parameters())
    gather = gather or (lambda per_rank: per_rank[0])
    buf, g_v = None, None
    for t, per_rank in enumerate(batches):
        if t < warmup or t % k == 0:
            pairs = [ref_look_grads(model, x, y, rho, m or x.shape[0]) for x, y in per_rank]
            g = gather([p[0] for p in pairs])
            d = gather([p[1] for p in pairs])
            coef = _dot(d, g) / _norm(g) ** 2
            g_v = [s - coef * u for s, u in zip(d, g)]
        else:
            g = gather([_grad(model, x, y) for x, y in per_rank])
            d = [u + alpha * (_norm(g) / _norm(g_v)) * v for u, v in zip(g, g_v)]
        buf = d if buf is None else [momentum * b + u for b, u in zip(buf, d)]
        with torch.no_grad():
            for p, b in zip(params, buf):
                p.sub_(lr * b)
    return [p.detach() for p in params]


def _batches(n_steps, b, seed=0):
    return [[make_batch("mlp", b, seed=seed + t)] for t in range(n_steps)]


def _run(model, opt, batches, **kw):
    for (x, y), in batches:
        dist_sam.sam_step(model, opt, LOSS, x, y, **kw)
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("ascent", ["local", "micro"])
def test_matches_float64_reference(ascent):
    model, batches = make_mlp(0), _batches(7, 8)
    m = 2 if ascent == "micro" else None
    ref = ref_looksam(model, batches, rho=0.1, k=3, alpha=0.5, lr=0.1, momentum=0.9, m=m)
    opt = dist_sam.create_optimizer("looksam", model.parameters(), base="sgd", lr=0.1, momentum=0.9,
                                    rho=0.1, k=3, alpha=0.5)
    out = _run(model, opt, batches, ascent=ascent, micro_batch_size=m)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert opt.num_steps == 7 and opt.g_v is not None


def test_warmup_takes_full_steps_first():
    model, batches = make_mlp(0), _batches(6, 8)
    ref = ref_looksam(model, batches, rho=0.1, k=4, alpha=0.7, lr=0.1, momentum=0.9, warmup=3)
    opt = dist_sam.create_optimizer("looksam", model.parameters(), lr=0.1, momentum=0.9, rho=0.1, k=4,
                                    alpha=0.7, warmup=3)
    for a, b in zip(_run(model, opt, batches), ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    kinds = []
    for t in range(10):
        opt.num_steps = t
        kinds.append(opt.should_perturb())
    assert kinds == [True, True, True, False, True, False, False, False, True, False]


def test_alpha_zero_off_steps_are_plain_sgd_steps():
    """alpha = 0: an off step is SGD's step on the same gradient, bit for bit."""
    batches = _batches(2, 8)
    a, b = make_mlp(0), make_mlp(0)
    look = dist_sam.create_optimizer("looksam", a.parameters(), lr=0.1, rho=0.1, k=2, alpha=0.0)
    sam = dist_sam.create_optimizer("sam", b.parameters(), lr=0.1, rho=0.1, interval=2)
    for p, q in zip(_run(a, look, batches), _run(b, sam, batches)):
        assert torch.equal(p, q)


def test_step_closure_matches_sam_step():
    batches = _batches(5, 8)
    a, b = make_mlp(0), make_mlp(0)
    kw = dict(lr=0.1, momentum=0.9, rho=0.1, k=2, alpha=0.4)
    opt_a = dist_sam.create_optimizer("looksam", a.parameters(), **kw)
    opt_b = dist_sam.create_optimizer("looksam", b.parameters(), **kw)
    _run(a, opt_a, batches)
    for (x, y), in batches:
        def closure():
            loss = LOSS(b(x), y).mean()
            loss.backward()
            return loss
        opt_b.step(closure)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("ascent", ["local", "micro"])
def test_state_dict_resume_is_bit_equal(ascent):
    batches = _batches(8, 8)
    kw = dict(base="sgd", lr=0.1, momentum=0.9, rho=0.1, k=3, alpha=0.5)
    step = dict(ascent=ascent, micro_batch_size=2 if ascent == "micro" else None)
    model = make_mlp(0)
    opt = dist_sam.create_optimizer("looksam", model.parameters(), **kw)
    _run(model, opt, batches[:4], **step)  # stops after an off step, g_v from step 3
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    straight = _run(model, opt, batches[4:], **step)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = make_mlp(5)
    resumed.load_state_dict(saved["model"])
    opt2 = dist_sam.create_optimizer("looksam", resumed.parameters(), **kw)
    opt2.load_state_dict(saved["opt"])
    assert opt2.num_steps == 4 and torch.equal(opt2.g_v_norm, saved["opt"]["looksam"]["g_v_norm"])
    for p, q in zip(_run(resumed, opt2, batches[4:], **step), straight):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=0), "k must be an integer >= 1"),
    (dict(k=2.0), "k must be an integer >= 1"),
    (dict(alpha=1.5), r"alpha must be a number in \[0, 1\]"),
    (dict(alpha="0.3"), r"alpha must be a number in \[0, 1\]"),
    (dict(warmup=-1), "warmup must be an integer >= 0"),
    (dict(interval=2), "LookSAM takes k"),
    (dict(rho=-0.1), "rho must be a number >= 0"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dist_sam.create_optimizer("looksam", make_mlp(0).parameters(), lr=0.1, **kwargs)


@pytest.mark.parametrize("step_kwargs, match", [
    (dict(ascent="global"), "ascent='global'"),
    (dict(ascent="full", ascent_data=[make_batch("mlp", 4)]), "ascent='full'"),
    (dict(ascent="micro", micro_batch_size=2, micro_impl="vmap"), "micro_impl='vmap'"),
])
def test_refused_step_modes_raise_before_any_work(step_kwargs, match):
    model = make_mlp(0)
    before = [p.clone() for p in model.parameters()]
    opt = dist_sam.create_optimizer("looksam", model.parameters(), lr=0.1)
    x, y = make_batch("mlp", 8)
    with pytest.raises(ValueError, match=match):
        dist_sam.sam_step(model, opt, LOSS, x, y, **step_kwargs)
    assert opt.num_steps == 0 and all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())
