"""First-order m-SAM (``"msam-fo"``, dist_sam.optim.first_order) against references written here.

The step's gradient must be ``∇F``, ``F = (1/c) Σ_j [L_j + rho ||g_j||]`` over the ``c = b/m`` groups
of the batch: against a float64 re-derivation by Hessian-vector products of
``torch.autograd.functional`` (plain parameters and BatchNorm statistics, both forms, several
steps with momentum), in fp32, against a finite difference of the penalty, against m-SAM to first
order (the difference is O(rho²)), and on 2 gloo processes under DDP (replicas bit-equal, one
gradient all-reduce per step).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

import dist_sam
from dist_sam import create_optimizer, sam_step

from dist_utils import run_distributed
from reference import make_batch, make_cnn, make_mlp

CE = nn.CrossEntropyLoss(reduction="none")
SGD = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
IMPLS = ("loop", "vmap")


class Recorder(torch.optim.Optimizer):
    """A base optimizer that keeps the gradients it is handed and leaves the weights alone."""

    def __init__(self, params, lr=0.0):
        super().__init__(params, dict(lr=lr))
        self.seen = None

    def step(self, closure=None):
        self.seen = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]


def ref_first_order_grad(model, x, y, m, rho):
    """``(1/c) Σ_j [g_j + rho H_j g_j / ||g_j||]``, ``H_j g_j`` by ``autograd.functional.hvp`` on the flat
    weights (a copy of ``model``: its BN statistics are not this reference's business)."""
    model = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    c = x.shape[0] // m

    def group_loss(xj, yj):
        def f(v):
            ps = dict(zip(names, [t.view(s) for t, s in zip(v.split([s.numel() for s in shapes]), shapes)]))
            return CE(functional_call(model, ps, (xj,)), yj).mean()
        return f

    total = torch.zeros_like(flat)
    for j in range(c):
        f = group_loss(x[j * m:(j + 1) * m], y[j * m:(j + 1) * m])
        g = torch.autograd.functional.jacobian(f, flat)
        _, hg = torch.autograd.functional.hvp(f, flat, g / g.norm())
        total += (g + rho * hg) / c
    return [t.view(s) for t, s in zip(total.split([s.numel() for s in shapes]), shapes)]


def ref_forwards(model, x, y, m):
    """One forward per group, in order (m-SAM's ascent forwards): the running statistics they leave
    and the mean loss at ``w`` (each group normalized by its own batch statistics)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        losses = torch.cat([CE(model(xj), yj) for xj, yj in zip(x.split(m), y.split(m))])
    return {k: v for k, v in model.named_buffers()}, losses.mean().float()


def _step_grad(model, x, y, *, m, rho, impl="loop", name="msam-fo", ascent="micro"):
    opt = create_optimizer(name, model.parameters(), base=Recorder, rho=rho)
    sam_step(model, opt, CE, x, y, ascent=ascent, micro_batch_size=m if ascent == "micro" else None, micro_impl=impl)
    return opt.base_optimizer.seen


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("m", [2, 4])
def test_matches_float64_hvp_reference_over_steps(impl, kind, m):
    make = make_mlp if kind == "mlp" else make_cnn
    model, ref = make(), make()
    opt = create_optimizer("msam-fo", model.parameters(), base="sgd", rho=0.1, **SGD)
    ref_opt = torch.optim.SGD(ref.parameters(), **SGD)
    for step in range(3):
        x, y = make_batch(kind, 8, seed=step)
        grads = ref_first_order_grad(ref, x, y, m, 0.1)
        buffers, ref_loss = ref_forwards(ref, x, y, m)
        loss = sam_step(model, opt, CE, x, y, ascent="micro", micro_batch_size=m, micro_impl=impl)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
        for p, g in zip(ref.parameters(), grads):
            p.grad = g
        ref_opt.step()
        with torch.no_grad():
            for k, v in ref.named_buffers():
                v.copy_(buffers[k])
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10)
    for (k, v), (_, r) in zip(model.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(v, r, rtol=0, atol=1e-10, msg=k)


@pytest.mark.parametrize("how", [dict(ascent="local", m=None), dict(m=8, impl="vmap"), dict(m=8, impl="loop")])
def test_local_ascent_is_one_group(how):
    x, y = make_batch("cnn", 8)
    got = _step_grad(make_cnn(), x, y, rho=0.05, **how)
    for a, b in zip(got, ref_first_order_grad(make_cnn(), x, y, 8, 0.05)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp32_matches_the_float64_reference(impl):
    model = make_cnn(dtype=torch.float32)
    x, y = make_batch("cnn", 16, dtype=torch.float32)
    got = _step_grad(model, x, y, m=4, rho=0.1, impl=impl)
    want = ref_first_order_grad(make_cnn(), x.double(), y, 4, 0.1)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_penalty_gradient_matches_a_finite_difference(impl):
    """``∇P``, ``P(w) = (1/c) Σ_j ||g_j(w)||``, as ``(∇F(rho) - ∇F(rho/2)) / (rho/2)`` of the step, against
    ``(P(w + t v) - P(w - t v)) / 2t`` along random directions (a smooth model: tanh, no kinks)."""
    model = make_mlp()
    x, y = make_batch("mlp", 12, seed=3)
    m, rho = 3, 0.2
    grad_p = [(a - b) / (rho / 2) for a, b in zip(_step_grad(model, x, y, m=m, rho=rho, impl=impl),
                                                  _step_grad(model, x, y, m=m, rho=rho / 2, impl=impl))]
    params = list(model.parameters())

    def penalty():
        norms = []
        for xj, yj in zip(x.split(m), y.split(m)):
            g = torch.autograd.grad(CE(model(xj), yj).mean(), params)
            norms.append(torch.sqrt(sum((t ** 2).sum() for t in g)))
        return torch.stack(norms).mean().item()

    gen = torch.Generator().manual_seed(0)
    w0 = [p.detach().clone() for p in params]
    for _ in range(3):
        v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        values = []
        for t in (1e-5, -1e-5):
            with torch.no_grad():
                for p, w, d in zip(params, w0, v):
                    p.copy_(w + t * d)
            values.append(penalty())
        with torch.no_grad():
            for p, w in zip(params, w0):
                p.copy_(w)
        fd = (values[0] - values[1]) / 2e-5
        analytic = sum((g * d).sum() for g, d in zip(grad_p, v)).item()
        assert analytic == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_equals_msam_to_first_order():
    """``||∇F(rho) - h_mSAM(rho)||`` is O(rho²): it falls by ~4 each time rho halves."""
    model = make_mlp()
    x, y = make_batch("mlp", 8, seed=5)
    diffs = []
    for rho in (0.02, 0.01, 0.005, 0.0025):
        fo = _step_grad(model, x, y, m=2, rho=rho)
        msam = _step_grad(model, x, y, m=2, rho=rho, name="sam")
        plain = _step_grad(model, x, y, m=2, rho=1e-300)  # the penalty's weight ~ 0: (1/c) Σ g_j
        diffs.append(torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(fo, msam))).item())
        shift = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(fo, plain))).item()
        assert diffs[-1] < 0.05 * shift  # the penalty term is what m-SAM adds, to first order
    ratios = [a / b for a, b in zip(diffs, diffs[1:])]
    assert all(3.6 < r < 4.4 for r in ratios), (diffs, ratios)


def test_interval_takes_plain_steps_in_between():
    model = make_mlp()
    opt = create_optimizer("msam-fo", model.parameters(), base=Recorder, rho=0.1, interval=2)
    seen = []
    for step in range(2):
        x, y = make_batch("mlp", 8, seed=step)
        sam_step(model, opt, CE, x, y, ascent="micro", micro_batch_size=2)
        seen.append(opt.base_optimizer.seen)
    x, y = make_batch("mlp", 8, seed=0)
    for a, b in zip(seen[0], ref_first_order_grad(model, x, y, 2, 0.1)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    x, y = make_batch("mlp", 8, seed=1)
    for a, b in zip(seen[1], torch.autograd.grad(CE(model(x), y).mean(), list(model.parameters()))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_loop_and_vmap_agree_in_float32_with_param_groups():
    a, b = make_cnn(dtype=torch.float32), make_cnn(dtype=torch.float32)
    opts = []
    for model in (a, b):
        groups = [dict(params=list(model.parameters())[:2], lr=0.05), dict(params=list(model.parameters())[2:])]
        opts.append(create_optimizer("msam-fo", groups, base="sgd", rho=0.1, lr=0.1, momentum=0.9))
    for step in range(2):
        x, y = make_batch("cnn", 8, seed=step, dtype=torch.float32)
        for model, opt, impl in zip((a, b), opts, IMPLS):
            sam_step(model, opt, CE, x, y, ascent="micro", micro_batch_size=2, micro_impl=impl)
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_refused_naming_the_value():
    model = make_mlp()
    params = list(model.parameters())
    x, y = make_batch("mlp", 8)
    for rho in (0, 0.0, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match=f"rho must be a number > 0.*{rho!r}"):
            create_optimizer("msam-fo", params, rho=rho, lr=0.1)
    with pytest.raises(ValueError, match="adaptive"):
        create_optimizer("msam-fo", params, rho=0.1, lr=0.1, adaptive=True)
    opt = create_optimizer("msam-fo", params, rho=0.1, lr=0.1)
    with pytest.raises(ValueError, match="micro_batch_size=3 does not divide the per-worker batch 8"):
        sam_step(model, opt, CE, x, y, ascent="micro", micro_batch_size=3)
    with pytest.raises(ValueError, match="ascent='global'"):
        sam_step(model, opt, CE, x, y, ascent="global")
    with pytest.raises(ValueError, match="GradScaler"):
        sam_step(model, opt, CE, x, y, scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="closure"):
        opt.step(lambda: None)
    with pytest.raises(RuntimeError, match="never perturbs"):
        opt.first_step()
    split = create_optimizer("msam-fo", [dict(params=params[:2], rho=0.2), dict(params=params[2:])], rho=0.1, lr=0.1)
    with pytest.raises(ValueError, match=r"one rho > 0 shared by every param group, got \[0.1, 0.2\]"):
        sam_step(model, split, CE, x, y)
    opt.param_groups[0]["rho"] = 0.0  # a rho schedule that reached 0
    with pytest.raises(ValueError, match=r"got \[0.0\]"):
        sam_step(model, opt, CE, x, y)
    with pytest.raises(ValueError, match="torch.compile'd model"):
        sam_step(torch.compile(model), opt_ok := create_optimizer("msam-fo", params, rho=0.1, lr=0.1), CE, x, y)
    assert opt_ok.num_steps == 0
    dropout = nn.Sequential(nn.Linear(6, 4), nn.Dropout(0.5))
    with pytest.raises(ValueError, match="dropout"):
        sam_step(dropout, create_optimizer("msam-fo", dropout.parameters(), rho=0.1, lr=0.1),
                 CE, x.float(), y, ascent="micro", micro_batch_size=2, micro_impl="vmap")
    assert "msam-fo" in dist_sam.list_optimizers() and isinstance(opt, dist_sam.FirstOrderMSAM)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), make_mlp().parameters()))  # nothing ran


def _ddp_worker(rank, world, kind, impl):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dist_sam.distributed import CommCounter

    make = make_mlp if kind == "mlp" else make_cnn
    out = {}
    for name in ("sgd", "msam-fo"):
        model = DDP(make())
        counter = CommCounter.attach(model)
        opt = (torch.optim.SGD(model.parameters(), **SGD) if name == "sgd"
               else create_optimizer("msam-fo", model.parameters(), base="sgd", rho=0.1, **SGD))
        comm = []
        for step in range(2):
            x, y = make_batch(kind, 16, seed=step)
            x, y = x[rank * 8:(rank + 1) * 8], y[rank * 8:(rank + 1) * 8]
            counter.reset()
            if name == "sgd":
                opt.zero_grad()
                CE(model(x), y).mean().backward()
                opt.step()
            else:
                sam_step(model, opt, CE, x, y, ascent="micro", micro_batch_size=2, micro_impl=impl)
            comm.append((counter.calls, counter.bytes))
        out[name] = dict(weights=[p.detach().clone() for p in model.module.parameters()], comm=comm)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind,impl", [("cnn", "loop"), ("cnn", "vmap"), ("mlp", "loop")])
def test_ddp_two_ranks_bit_equal_one_all_reduce_and_the_reference(kind, impl):
    results = run_distributed(_ddp_worker, world_size=2, args=(kind, impl))
    for r in results:
        assert r["msam-fo"]["comm"] == r["sgd"]["comm"] and r["sgd"]["comm"][0][0] == 1, r  # SGD's one reduction
    for a, b in zip(results[0]["msam-fo"]["weights"], results[1]["msam-fo"]["weights"]):
        assert torch.equal(a, b)
    # the same as one process over the concatenated batch: per-group terms, averaged over all 8 groups
    make = make_mlp if kind == "mlp" else make_cnn
    ref = make()
    ref_opt = torch.optim.SGD(ref.parameters(), **SGD)
    for step in range(2):
        x, y = make_batch(kind, 16, seed=step)
        for p, g in zip(ref.parameters(), ref_first_order_grad(ref, x, y, 2, 0.1)):
            p.grad = g
        ref_opt.step()
    for a, b in zip(results[0]["msam-fo"]["weights"], ref.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-10)
