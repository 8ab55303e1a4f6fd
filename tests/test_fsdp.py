"""FSDP2 (``fully_shard``) SAM with 2 real gloo processes, against float64 re-derivations of SPEC.md.

Local SAM under FSDP2 must give the update DDP local SAM gives on the same per-rank batches:
``w <- base_step(w, (1/K) Σ_k ∇L_k(w + e_k))`` with ``e_k`` from rank k's own batch (SPEC.md §2),
while never modifying the sharded weights during the passes and communicating no more than a
plain FSDP2 step. Every configuration runs in one pair of processes (spawning is the slow part).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dist_utils import run_distributed
from reference import ref_base_step, ref_gibbs_weights, ref_msam_grad, ref_perturbation

CE = nn.CrossEntropyLoss(reduction="none")
WORLD, B, STEPS = 2, 8, 2
LR, MOM, RHO = 0.1, 0.9, 0.05

pytestmark = pytest.mark.slow


class Net(nn.Module):
    """Three FSDP units with uneven shards (16·7 and 4·13 do not split evenly in two), a BN and a root."""

    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.Linear(6, 7), nn.Tanh())
        self.mid = nn.Sequential(nn.Linear(7, 13), nn.BatchNorm1d(13) if bn else nn.Identity(), nn.Tanh())
        self.head = nn.Linear(13, 4)

    def forward(self, x):
        return self.head(self.mid(self.inp(x)))


def make_net(dtype=torch.float32, bn=False) -> Net:
    torch.manual_seed(0)
    return Net(bn).to(dtype)


def batch(step: int, rank: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(WORLD * B, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (WORLD * B,), generator=g)
    return x[rank * B:(rank + 1) * B].to(dtype), y[rank * B:(rank + 1) * B]


# -- collective counting (in the worker processes) -------------------------------------------------
class Counter:
    def __init__(self):
        self.reset()

    def reset(self):
        self.calls = {"all_gather": 0, "reduce_scatter": 0, "all_reduce": 0}
        self.bytes = dict.fromkeys(self.calls, 0)

    def wrap(self, kind, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            tensors = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
            self.calls[kind] += 1
            self.bytes[kind] += max(t.numel() * t.element_size() for t in tensors)
            return fn(*args, **kwargs)
        return counted


def _install_counter() -> Counter:
    counter = Counter()
    dist.all_gather_single = counter.wrap("all_gather", dist.all_gather_single)
    dist.reduce_scatter_single = counter.wrap("reduce_scatter", dist.reduce_scatter_single)
    dist.all_reduce = counter.wrap("all_reduce", dist.all_reduce)
    return counter


def _shard(model, mp=None, ac=False):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    kw = {} if mp is None else {"mp_policy": MixedPrecisionPolicy(param_dtype=mp, reduce_dtype=torch.float32)}
    for name in ("inp", "mid", "head"):
        unit = getattr(model, name)
        if ac:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
            unit = checkpoint_wrapper(unit)
            setattr(model, name, unit)
        fully_shard(unit, **kw)
    fully_shard(model, **kw)
    return model


def _full(model):
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def _run(case: dict, rank: int, counter: Counter) -> dict:
    import dist_sam
    model = _shard(make_net(bn=case.get("bn", False)), mp=case.get("mp"), ac=case.get("ac", False))
    opt = dist_sam.create_optimizer(case.get("variant", "sam"), model.parameters(), base="sgd", lr=LR,
                                    momentum=MOM, **{"rho": RHO, **case.get("opt", {})})
    kwargs = {"ascent": case.get("ascent", "local"), **case.get("step", {})}
    out = {"comm": [], "sharded_unchanged": True}
    for step in range(STEPS):
        x, y = batch(step, rank)
        if case.get("nan_on_rank") == rank and step == 0:
            x = x.clone()
            x[0, 0] = float("inf")
        before = [p.to_local().clone() for p in model.parameters()]  # compared bit for bit before the step
        orig_step = opt.base_optimizer.step

        def checking_step(*a, **k):
            out["sharded_unchanged"] &= all(torch.equal(b, p.to_local()) for b, p in zip(before, model.parameters()))
            return orig_step(*a, **k)
        opt.base_optimizer.step = checking_step
        counter.reset()
        dist_sam.sam_step(model, opt, CE, x, y, **kwargs)
        out["comm"].append((dict(counter.calls), dict(counter.bytes)))
        opt.base_optimizer.step = orig_step
    out["weights"] = _full(model)
    out["buffers"] = [b.clone() for b in model.buffers()]
    return out


def _plain_comm(rank: int, counter: Counter) -> dict:
    model = _shard(make_net())
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOM)
    comm = []
    for step in range(STEPS):
        x, y = batch(step, rank)
        counter.reset()
        CE(model(x), y).mean().backward()
        opt.step()
        opt.zero_grad()
        comm.append((dict(counter.calls), dict(counter.bytes)))
    return comm[-1]


CASES = {
    "sam": {},
    "usam": {"variant": "usam"},
    "asam": {"variant": "asam", "opt": {"rho": 0.5, "eta": 0.01}},
    "micro": {"step": {"ascent": "micro", "micro_batch_size": B // 4}},
    "accumulation": {"step": {"accumulation_steps": 2}},
    "global": {"ascent": "global"},
    "global_asam": {"ascent": "global", "variant": "asam", "opt": {"rho": 0.5, "eta": 0.01}},
    "lean": {"step": {"fsdp_memory": "lean"}},
    "lean_micro": {"step": {"fsdp_memory": "lean", "ascent": "micro", "micro_batch_size": B // 2}},
    "clip": {"step": {"clip_grad_norm": 0.05}},
    "ac": {"ac": True},
    "bn": {"bn": True},
    "rw_last_layer": {"variant": "rwsam", "opt": {"lam": 0.5, "estimator": "last_layer"}},
    "rw_lean_last_layer": {"variant": "rwsam", "opt": {"lam": 0.5, "estimator": "last_layer"},
                           "step": {"fsdp_memory": "lean"}},
    "rw_exact": {"variant": "rwsam", "opt": {"lam": 0.5, "estimator": "exact"}},
    "rw_fd": {"variant": "rwsam", "opt": {"lam": 0.5, "estimator": "fd", "mu": 1e-3}},
    "nonfinite": {"nan_on_rank": 1},
    "bf16": {"mp": torch.bfloat16},
}


def _worker(rank, world, names):
    counter = _install_counter()
    results = {"plain": _plain_comm(rank, counter)}
    for name in names:
        try:
            results[name] = _run(CASES[name], rank, counter)
        except Exception:  # noqa: BLE001 - reported by the test of that case
            import traceback
            results[name] = {"error": traceback.format_exc()}
    return results


def _case(results, rank, name):
    out = results[rank][name]
    assert "error" not in out, out.get("error")
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, WORLD, args=(list(CASES),), timeout=600)


# -- float64 references (independent of dist_sam) --------------------------------------------------
def _ref_local(case: str, steps: int = STEPS):
    """Each rank's own ascent (SPEC §1-§3) on its own batch; the ranks' descent gradients averaged."""
    spec = CASES[case]
    variant, rho = spec.get("variant", "sam"), spec.get("opt", {}).get("rho", RHO)
    eta = spec.get("opt", {}).get("eta", 0.0)
    step_kw = spec.get("step", {})
    m = step_kw.get("micro_batch_size") or B // step_kw.get("accumulation_steps", 1)
    ref = make_net(torch.float64, bn=spec.get("bn", False))
    opt = torch.optim.SGD(ref.parameters(), lr=LR, momentum=MOM)
    for step in range(steps):
        per_rank = []
        for k in reversed(range(WORLD)):  # rank 0 last: its BN statistics are the reference's
            replica = ref if k == 0 else copy.deepcopy(ref)
            weight_fn = _rw_weights(spec, step, k) if variant == "rwsam" else None
            x, y = batch(step, k, torch.float64)
            per_rank.append(ref_msam_grad(replica, CE, x, y, m=m, variant="sam" if variant == "rwsam" else variant,
                                          rho=rho, eta=eta, weight_fn=weight_fn))
        grads = [sum(hs) / WORLD for hs in zip(*per_rank)]
        clip = step_kw.get("clip_grad_norm")
        if clip is not None:
            norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
            grads = [g * min(1.0, clip / (norm.item() + 1e-6)) for g in grads]
        ref_base_step(ref, opt, grads)
    return ref


def _rw_weights(spec, step, rank):
    """RW-SAM's weights (SPEC §3) from exact per-sample gradient norms (``exact``; ``last_layer``:
    the final Linear's share, which its closed form gives exactly) or from the fd formula along
    the direction the library draws for (seed 0, step, rank, group 0)."""
    from reference import ref_fd_estimates, ref_per_sample_grads
    estimator = spec["opt"]["estimator"]

    def weights(model, x, y):
        if estimator == "fd":
            from dist_sam.optim.estimators import direction_seed, rademacher_directions
            v = list(rademacher_directions(list(model.parameters()), direction_seed(0, step, rank, 0), 1))
            s = ref_fd_estimates(model, CE, x, y, v, spec["opt"]["mu"])
        else:
            params = list(model.head.parameters()) if estimator == "last_layer" else list(model.parameters())
            g = ref_per_sample_grads(model, CE, x, y, params)
            s = torch.stack([torch.sqrt(sum((t ** 2).sum() for t in gi)) for gi in g])
        return ref_gibbs_weights(s, spec["opt"]["lam"], "zscore")
    return weights


def _ref_global(case: str):
    spec = CASES[case]
    variant, rho, eta = spec.get("variant", "sam"), spec.get("opt", {}).get("rho", RHO), spec.get("opt", {}).get("eta", 0.0)
    ref = make_net(torch.float64)
    opt = torch.optim.SGD(ref.parameters(), lr=LR, momentum=MOM)
    for step in range(STEPS):
        xs, ys = zip(*(batch(step, k, torch.float64) for k in range(WORLD)))
        grads = ref_msam_grad(ref, CE, torch.cat(xs), torch.cat(ys), m=WORLD * B, variant=variant, rho=rho, eta=eta)
        ref_base_step(ref, opt, grads)
    return ref


def _assert_close(weights, ref, rtol=1e-6):
    for p, q in zip(weights, ref.parameters()):
        q = q.detach().to(p.dtype)
        err = (p - q).abs().max() / q.abs().max()
        assert err <= rtol, f"relative error {err:.3g} > {rtol}"


@pytest.mark.parametrize("case", ["sam", "usam", "asam", "micro", "accumulation", "lean", "lean_micro", "clip",
                                  "ac", "bn", "rw_last_layer", "rw_lean_last_layer", "rw_exact", "rw_fd"])
def test_local_modes_equal_the_float64_reference_on_every_rank(results, case):
    ref = _ref_local(case)
    for rank in range(WORLD):
        _assert_close(_case(results, rank, case)["weights"], ref)
    for p, q in zip(_case(results, 0, case)["weights"], _case(results, 1, case)["weights"]):
        assert torch.equal(p, q)


@pytest.mark.parametrize("case", ["global", "global_asam"])
def test_global_mode_equals_sam_on_the_global_batch(results, case):
    ref = _ref_global(case)
    for rank in range(WORLD):
        _assert_close(_case(results, rank, case)["weights"], ref)


@pytest.mark.parametrize("case", list(CASES))
def test_the_passes_never_modify_the_sharded_weights(results, case):
    for rank in range(WORLD):
        assert _case(results, rank, case)["sharded_unchanged"]


def test_batchnorm_statistics_follow_the_ascent_forward_only(results):
    ref = _ref_local("bn")
    for b, q in zip(_case(results, 0, "bn")["buffers"], ref.buffers()):
        torch.testing.assert_close(b.to(q.dtype), q, rtol=0, atol=1e-6)


def test_local_sam_communicates_no_more_than_plain_fsdp2(results):
    plain_calls, plain_bytes = results[0]["plain"]
    for case in ("sam", "asam", "rw_last_layer", "rw_exact", "rw_fd", "usam"):
        calls, nbytes = _case(results, 0, case)["comm"][-1]
        assert calls["reduce_scatter"] == plain_calls["reduce_scatter"] == 3
        assert nbytes["reduce_scatter"] == plain_bytes["reduce_scatter"]
        assert nbytes["all_gather"] < plain_bytes["all_gather"]  # one all-gather per unit, plain makes two
        assert calls["all_gather"] == 3
        assert nbytes["all_reduce"] <= 8  # the norm across shards: one scalar


def test_lean_adds_one_all_gather_and_global_one_reduce_scatter(results):
    plain_calls, plain_bytes = results[0]["plain"]
    lean_calls, lean_bytes = _case(results, 0, "lean")["comm"][-1]
    assert lean_calls["reduce_scatter"] == plain_calls["reduce_scatter"]
    assert lean_bytes["all_gather"] == plain_bytes["all_gather"] + _case(results, 0, "sam")["comm"][-1][1]["all_gather"]
    g_calls, g_bytes = _case(results, 0, "global")["comm"][-1]
    assert g_bytes["reduce_scatter"] == 2 * plain_bytes["reduce_scatter"]
    assert g_bytes["all_gather"] <= plain_bytes["all_gather"]


def test_nonfinite_gradient_on_one_rank_skips_the_step_on_every_rank(results):
    # Step 0 has an inf input on rank 1: both ranks skip it; step 1 is an ordinary SAM step.
    ref = make_net(torch.float64)
    opt = torch.optim.SGD(ref.parameters(), lr=LR, momentum=MOM)
    per_rank = []
    for k in reversed(range(WORLD)):
        x, y = batch(1, k, torch.float64)
        per_rank.append(ref_msam_grad(ref if k == 0 else copy.deepcopy(ref), CE, x, y, m=B, variant="sam", rho=RHO))
    ref_base_step(ref, opt, [sum(hs) / WORLD for hs in zip(*per_rank)])
    for rank in range(WORLD):
        weights = _case(results, rank, "nonfinite")["weights"]
        assert all(torch.isfinite(w).all() for w in weights)
        _assert_close(weights, ref)


def test_bf16_parameters_with_fp32_reduction_stay_near_the_reference(results):
    ref = _ref_local("sam")
    for rank in range(WORLD):
        for p, q in zip(_case(results, rank, "bf16")["weights"], ref.parameters()):
            assert torch.isfinite(p).all()
            assert (p - q.to(p.dtype)).abs().max() / q.abs().max() < 3e-2  # bf16 noise (FSDP.md §4)
    for p, q in zip(_case(results, 0, "bf16")["weights"], _case(results, 1, "bf16")["weights"]):
        assert torch.equal(p, q)


def _refusals(rank, world):
    import dist_sam
    from torch.distributed.fsdp import fully_shard
    x, y = batch(0, rank)
    out = {}

    def attempt(name, model, opt, **kw):
        sharded = all(hasattr(p, "to_local") for p in model.parameters())
        before = [p.to_local().clone() for p in model.parameters()] if sharded else None
        try:
            dist_sam.sam_step(model, opt, CE, x, y, **kw)
            out[name] = None
        except ValueError as err:
            out[name] = str(err)
        if before is not None:
            out[name + "_untouched"] = all(torch.equal(b, p.to_local()) for b, p in zip(before, model.parameters()))

    model = _shard(make_net())
    sgd = dict(base="sgd", lr=LR, rho=RHO)
    attempt("lean_asam", model, dist_sam.create_optimizer("asam", model.parameters(), **sgd), fsdp_memory="lean")
    attempt("lean_fd", model, dist_sam.create_optimizer("rwsam", model.parameters(), estimator="fd", **sgd),
            fsdp_memory="lean")
    attempt("bad_memory", model, dist_sam.create_optimizer("sam", model.parameters(), **sgd), fsdp_memory="tiny")
    attempt("scaler", model, dist_sam.create_optimizer("sam", model.parameters(), **sgd),
            scaler=torch.amp.GradScaler("cpu"))
    attempt("full", model, dist_sam.create_optimizer("sam", model.parameters(), **sgd), ascent="full",
            ascent_data=[(x, y)])
    other = make_net()
    attempt("foreign_optimizer", model, dist_sam.create_optimizer("sam", other.parameters(), **sgd))
    nested_only = make_net()
    fully_shard(nested_only.inp)
    attempt("no_root", nested_only, dist_sam.create_optimizer("sam", nested_only.parameters(), **sgd))
    plain = make_net()
    attempt("memory_on_ddp", plain, dist_sam.create_optimizer("sam", plain.parameters(), **sgd), fsdp_memory="lean")
    return out


def test_unsupported_combinations_are_refused_before_any_work():
    out = run_distributed(_refusals, WORLD)[0]
    expected = {"lean_asam": "ASAM", "lean_fd": "'fd'", "bad_memory": "'tiny'", "scaler": "GradScaler",
                "full": "ascent='full'", "foreign_optimizer": "model.parameters()", "no_root": "root",
                "memory_on_ddp": "fsdp_memory"}
    for name, needle in expected.items():
        assert out[name] is not None and needle in out[name], (name, out[name])
    for name in ("lean_asam", "lean_fd", "bad_memory", "scaler", "full", "foreign_optimizer"):
        assert out[name + "_untouched"], name
