"""Single-process properties of SAM, USAM, ASAM, m-SAM and sam_step (SPEC.md §1-2)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dist_sam
from dist_sam import SAM, create_optimizer, sam_step

from reference import (bn_buffers, make_batch, make_cnn, make_mlp, ref_base_step, ref_msam_grad,
                       ref_perturbation)

CE = nn.CrossEntropyLoss(reduction="none")
BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
}
VARIANTS = {  # name -> (create_optimizer name, SAM kwargs, reference kwargs)
    "sam": ("sam", dict(rho=0.05), dict(variant="sam", rho=0.05)),
    "usam": ("usam", dict(rho=0.05), dict(variant="usam", rho=0.05)),
    "asam": ("asam", dict(rho=0.5, eta=0.01), dict(variant="asam", rho=0.5, eta=0.01)),
    "asam-eta0": ("asam", dict(rho=0.5, eta=0.0), dict(variant="asam", rho=0.5, eta=0.0)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("micro", [False, True])
def test_step_matches_float64_reference(variant, kind, base, micro):
    name, kw, ref_kw = VARIANTS[variant]
    make = make_mlp if kind == "mlp" else make_cnn
    model, ref = make(), make()
    base_cls, base_kw = BASES[base]
    opt = create_optimizer(name, model.parameters(), base=base_cls, **kw, **base_kw)
    ref_opt = base_cls(ref.parameters(), **base_kw)
    b = 8
    m = b // 2 if micro else b
    for step in range(3):  # several steps: momentum / Adam state matters
        x, y = make_batch(kind, b, seed=step)
        sam_step(model, opt, CE, x, y, ascent="micro" if micro else "local", micro_batch_size=m if micro else None)
        h = ref_msam_grad(ref, CE, x, y, m=m, **ref_kw)
        ref_base_step(ref, ref_opt, h)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10)
    for (k, v), (_, r) in zip(model.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(v, r, rtol=0, atol=1e-10, msg=k)


def test_perturbation_is_one_global_norm_across_param_groups():
    model = make_mlp()
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), "weight_decay": 0.0}]
    opt = SAM(groups, torch.optim.SGD, rho=0.1, lr=0.0)
    x, y = make_batch("mlp", 8)
    CE(model(x), y).mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    opt.first_step()
    e = ref_perturbation(grads, before, variant="sam", rho=0.1)
    for p, w, ei in zip(model.parameters(), before, e):
        torch.testing.assert_close(p.detach() - w, ei, rtol=0, atol=1e-14)
    opt.second_step()


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_rho_zero_reproduces_base_step_bit_for_bit(kind):
    make = make_mlp if kind == "mlp" else make_cnn
    model, plain = make(dtype=torch.float32), make(dtype=torch.float32)
    opt = create_optimizer("sam", model.parameters(), rho=0.0, lr=0.1, momentum=0.9, weight_decay=1e-3)
    base = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for step in range(3):
        x, y = make_batch(kind, 8, seed=step, dtype=torch.float32)
        sam_step(model, opt, CE, x, y)
        base.zero_grad()
        CE(plain(x), y).mean().backward()
        base.step()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p, q)
    for v, r in zip(model.buffers(), plain.buffers()):
        assert torch.equal(v, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_restore_is_exact(dtype):
    model = make_mlp(dtype=dtype)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.7, lr=0.0)  # lr 0: the base step changes nothing
    x, y = make_batch("mlp", 8, dtype=dtype)
    before = [p.detach().clone() for p in model.parameters()]
    CE(model(x).float(), y).mean().backward()
    opt.first_step(zero_grad=True)
    perturbed = [p.detach().clone() for p in model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, perturbed))
    # Subtracting e would not restore w in low precision: the property below is not vacuous.
    e = [a - b for a, b in zip(perturbed, before)]
    if dtype != torch.float32:
        assert any(not torch.equal(pp - ei, b) for pp, ei, b in zip(perturbed, e, before))
    CE(model(x).float(), y).mean().backward()
    opt.second_step(zero_grad=True)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_state_dict_round_trip_and_lockstep_across_reload(tmp_path):
    def build():
        model = make_cnn(dtype=torch.float32)
        return model, create_optimizer("sam", model.parameters(), base="sgd", lr=0.05, momentum=0.9, rho=0.1)

    (ma, oa), (mb, ob) = build(), build()
    batches = [make_batch("cnn", 8, seed=s, dtype=torch.float32) for s in range(8)]
    for x, y in batches[:4]:
        sam_step(ma, oa, CE, x, y)
        sam_step(mb, ob, CE, x, y)
    sd = oa.state_dict()
    # No weight copy or perturbation in the saved state: only SGD's momentum buffers.
    assert all(set(s) == {"momentum_buffer"} for s in sd["state"].values())
    assert sd["sam"] == {"num_steps": 4}
    torch.save({"model": ma.state_dict(), "opt": sd}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    mc, oc = build()
    mc.load_state_dict(ckpt["model"])
    oc.load_state_dict(ckpt["opt"])
    assert oc.num_steps == 4
    assert oc.param_groups is oc.base_optimizer.param_groups
    for x, y in batches[4:]:
        sam_step(mb, ob, CE, x, y)
        sam_step(mc, oc, CE, x, y)
    for p, q in zip(mb.parameters(), mc.parameters()):
        assert torch.equal(p, q)


def test_state_is_the_base_optimizers_so_dcp_takes_no_step():
    """torch.distributed.checkpoint's optimizer state-dict API (Accelerate's FSDP2 checkpoints) takes a
    zero-gradient ``step()`` to initialize an optimizer whose ``state`` is empty: with momentum that
    decays the buffers by 0.9 and counts a SAM step. SAM's ``state`` is its base optimizer's."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    model = make_mlp(dtype=torch.float32)
    opt = create_optimizer("sam", model.parameters(), base="sgd", lr=0.05, momentum=0.9, rho=0.1)
    x, y = make_batch("mlp", 8, seed=0, dtype=torch.float32)
    sam_step(model, opt, CE, x, y)
    assert opt.state is opt.base_optimizer.state and len(opt.state) > 0
    buffers = [s["momentum_buffer"].clone() for s in opt.base_optimizer.state.values()]
    _init_optim_state(opt)
    assert opt.num_steps == 1
    assert all(torch.equal(s["momentum_buffer"], b) for s, b in zip(opt.base_optimizer.state.values(), buffers))
    opt.load_state_dict(opt.state_dict())  # the base rebuilds its state dict: still shared
    assert opt.state is opt.base_optimizer.state


@pytest.mark.parametrize("name", ["sam", "usam", "asam"])
def test_convergence_on_regression(name):
    torch.manual_seed(0)
    x = torch.randn(256, 5)
    w_true = torch.randn(5, 1)
    y = x @ w_true + 0.01 * torch.randn(256, 1)
    model = nn.Sequential(nn.Linear(5, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = create_optimizer(name, model.parameters(), base="adam", lr=1e-2)
    mse = lambda out, t: ((out - t) ** 2).mean(dim=1)  # noqa: E731 - per-sample losses
    initial = mse(model(x), y).mean().item()
    for _ in range(300):
        sam_step(model, opt, mse, x, y)
    final = mse(model(x), y).mean().item()
    assert final < 0.02 * initial and final < 0.05


def test_descent_leaves_batchnorm_running_stats_as_the_ascent_left_them():
    model, ref = make_cnn(), make_cnn()
    opt = create_optimizer("sam", model.parameters(), lr=0.0, rho=0.5)
    x, y = make_batch("cnn", 8)
    sam_step(model, opt, CE, x, y)
    ref(x)  # one training-mode forward at w: the only update the step may make
    for (k, v), r in zip(model.named_buffers(), ref.buffers()):
        assert torch.equal(v, r), k
    assert model[1].num_batches_tracked.item() == 1


def test_freeze_bn_off_updates_twice():
    model = make_cnn()
    opt = create_optimizer("sam", model.parameters(), lr=0.0, rho=0.5)
    sam_step(model, opt, CE, *make_batch("cnn", 8), freeze_bn=False)
    assert model[1].num_batches_tracked.item() == 2


def test_lr_scheduler_on_wrapper_drives_base_lr():
    model = make_mlp()
    opt = create_optimizer("sam", model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = make_batch("mlp", 8)
    with pytest.warns(None) if False else _no_warning():
        for _ in range(2):
            sam_step(model, opt, CE, x, y)
            sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.25


class _no_warning:
    def __enter__(self):
        import warnings
        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def test_base_optimizer_instance_shares_groups():
    model = make_mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.3)
    opt = SAM(model.parameters(), base, rho=0.05)
    assert opt.param_groups is base.param_groups
    sched = torch.optim.lr_scheduler.LambdaLR(base, lambda s: 0.1)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.03)
    del sched


def test_step_closure_equals_sam_step():
    model_a, model_b = make_cnn(), make_cnn()
    oa = create_optimizer("sam", model_a.parameters(), lr=0.1, momentum=0.9)
    ob = create_optimizer("sam", model_b.parameters(), lr=0.1, momentum=0.9)
    for s in range(2):
        x, y = make_batch("cnn", 8, seed=s)
        sam_step(model_a, oa, CE, x, y)

        def closure():
            loss = CE(model_b(x), y).mean()
            loss.backward()
            return loss

        with dist_sam.frozen_running_stats(model_b, enabled=False):
            pass
        ob.step(closure)
    # step(closure) has no BN policy of its own: compare weights only.
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_interval_alternates_sam_and_base_steps():
    model, ref = make_mlp(), make_mlp()
    opt = create_optimizer("sam", model.parameters(), lr=0.1, rho=0.2, interval=2)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for s in range(4):
        x, y = make_batch("mlp", 8, seed=s)
        sam_step(model, opt, CE, x, y)
        if s % 2 == 0:
            h = ref_msam_grad(ref, CE, x, y, m=8, variant="sam", rho=0.2)
        else:
            h = list(torch.autograd.grad(CE(ref(x), y).mean(), list(ref.parameters())))
        ref_base_step(ref, ref_opt, h)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_nonfinite_gradient_skips_step_and_keeps_weights():
    model = make_mlp()
    opt = create_optimizer("sam", model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = make_batch("mlp", 8)
    x[0, 0] = float("inf")
    with pytest.warns(UserWarning, match="non-finite"):
        sam_step(model, opt, CE, x, y)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


# -- bad input: ValueError naming the argument, before any forward ---------------------------
class _CountingModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 4).double()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


@pytest.mark.parametrize("kwargs, field", [
    (dict(rho=-0.1), "rho"), (dict(eta=-1.0), "eta"), (dict(interval=0), "interval"),
    (dict(interval=1.5), "interval"),
])
def test_bad_constructor_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SAM(make_mlp().parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_bad_names_and_base():
    with pytest.raises(ValueError, match="unknown optimizer name 'samm'"):
        create_optimizer("samm", make_mlp().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="base_optimizer"):
        SAM(make_mlp().parameters(), "sgd", lr=0.1)
    with pytest.raises(ValueError, match="base_optimizer"):
        SAM(make_mlp().parameters(), nn.Linear, lr=0.1)
    assert {"sam", "usam", "asam"} <= set(dist_sam.list_optimizers())


@pytest.mark.parametrize("kwargs, field", [
    (dict(ascent="micro", micro_batch_size=3), "micro_batch_size"),
    (dict(ascent="micro", micro_batch_size=0), "micro_batch_size"),
    (dict(ascent="sideways"), "ascent"),
    (dict(accumulation_steps=3), "accumulation_steps"),
    (dict(clip_grad_norm=-1.0), "clip_grad_norm"),
    (dict(ascent="full"), "ascent_data"),
])
def test_bad_step_arguments_raise_before_any_forward(kwargs, field):
    model = _CountingModel()
    opt = create_optimizer("sam", model.parameters(), lr=0.1)
    x, y = make_batch("mlp", 8)
    with pytest.raises(ValueError, match=field):
        sam_step(model, opt, CE, x, y, **kwargs)
    assert model.calls == 0


def test_loss_fn_of_wrong_shape_raises_and_leaves_weights():
    model = make_mlp()
    opt = create_optimizer("sam", model.parameters(), lr=0.1)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="loss_fn"):
        sam_step(model, opt, nn.CrossEntropyLoss(), *make_batch("mlp", 8))  # reduction='mean': a scalar
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert not opt.is_perturbed


def test_plain_optimizer_is_refused():
    model = make_mlp()
    with pytest.raises(ValueError, match="optimizer"):
        sam_step(model, torch.optim.SGD(model.parameters(), lr=0.1), CE, *make_batch("mlp", 8))


def test_base_step_is_the_plain_optimizer_step():
    model, plain = make_cnn(dtype=torch.float32), make_cnn(dtype=torch.float32)
    opt = create_optimizer("sam", model.parameters(), lr=0.1, momentum=0.9, rho=0.5)
    base = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    for step in range(2):
        x, y = make_batch("cnn", 8, seed=step, dtype=torch.float32)
        dist_sam.base_step(model, opt, CE, x, y)
        base.zero_grad()
        CE(plain(x), y).mean().backward()
        base.step()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p, q)
    assert opt.num_steps == 2


@pytest.mark.parametrize("ascent, extra", [("local", {}), ("micro", {"micro_batch_size": 4}), ("full", None)])
def test_grad_scaler_gives_the_unscaled_step(ascent, extra):
    """Loss scaling by a power of two is exact: with a GradScaler every mode takes the same step."""
    data = [make_batch("mlp", 8, seed=50 + i) for i in range(2)]
    kwargs = dict(ascent=ascent, **(extra or {}))
    if ascent == "full":
        kwargs["ascent_data"] = data
    weights = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)):
        model = make_mlp()
        opt = create_optimizer("usam", model.parameters(), lr=0.1, rho=0.5)  # USAM: e is linear in g's scale
        for s in range(2):
            sam_step(model, opt, CE, *make_batch("mlp", 8, seed=s), scaler=scaler, **kwargs)
        weights.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*weights):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


class _PointerSAM(SAM):
    """Records, at each perturbation, where the ascent gradient and then the weights live."""

    log: list

    def perturb(self, grads, **kw):
        before = [p.data_ptr() for p in self.params]
        super().perturb(grads, **kw)
        self.log.append(([g.data_ptr() for g in grads], before, [p.data_ptr() for p in self.params]))


@pytest.mark.parametrize("ascent", ["micro", "global"])
def test_msam_reuses_one_buffer_per_parameter_and_never_writes_w(ascent):
    """Issue 14: no fresh gradient buffers per micro-batch and no copy of w. Every micro-batch's
    ascent gradient is taken into the same buffer, w + e is written over it and computed with,
    and w's own storage is never written (lr = 0: the base step keeps w)."""
    model = make_cnn(dtype=torch.float32) if ascent == "micro" else make_mlp(dtype=torch.float32)
    opt = _PointerSAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.0)
    opt.log = []
    home = [p.data_ptr() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    x, y = make_batch("cnn" if ascent == "micro" else "mlp", 16, dtype=torch.float32)
    for _ in range(2):
        if ascent == "micro":
            sam_step(model, opt, CE, x, y, ascent="micro", micro_batch_size=4)
        else:  # the synchronized ascent's path: accumulated through .grad (one process here)
            sam_step(model, opt, CE, x, y, ascent="global", accumulation_steps=4)
    assert len(opt.log) == 2 * 4
    grads, at, weights = (set(map(tuple, col)) for col in zip(*opt.log))
    assert at == {tuple(home)}  # every ascent ran at w's own storage
    assert len(grads) == 1 and grads == weights  # one buffer per parameter, and w + e lives in it
    assert grads.isdisjoint({tuple(home)})
    assert [p.data_ptr() for p in model.parameters()] == home  # w's storage is the parameter again
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_parameters_viewing_one_flat_buffer_still_view_it_after_steps():
    """Parameters that are views of one flat buffer (as DeepSpeed's and apex's optimizers keep
    them) are views of it again after the restore, and the base step's update lands there."""
    model = make_mlp(dtype=torch.float64)
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        p.data = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    ref = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1)
    ref_opt = SAM(ref.parameters(), torch.optim.SGD, rho=0.3, lr=0.1)
    x, y = make_batch("mlp", 8)
    for _ in range(2):
        sam_step(model, opt, CE, x, y, ascent="micro", micro_batch_size=4)
        sam_step(ref, ref_opt, CE, x, y, ascent="micro", micro_batch_size=4)
    assert torch.equal(flat, torch.cat([p.detach().reshape(-1) for p in ref.parameters()]))
    assert all(p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for p in params)


def test_ascent_buffers_refused_while_perturbed():
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1)
    x, y = make_batch("mlp", 8)
    CE(model(x), y).mean().backward()
    opt.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match="restore"):
        opt.ascent_buffers()
    opt.restore()
    assert all(torch.count_nonzero(b) == 0 for b in opt.ascent_buffers())
