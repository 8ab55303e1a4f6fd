"""Data-parallel SAM with 2 real gloo processes (SPEC.md §2), against float64 references."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import dist_sam
from dist_sam import SAM, sam_step
from dist_sam.distributed import CommCounter

from dist_utils import run_distributed
from reference import make_batch, make_cnn, make_mlp, ref_base_step, ref_msam_grad

CE = nn.CrossEntropyLoss(reduction="none")
WORLD = 2
B = 8  # per-worker batch
LR, MOM, RHO = 0.1, 0.9, 0.05


class RecordingSAM(SAM):
    """SAM that remembers the weights ``w + e`` of its last perturbation (``w`` is the same on
    every rank, so equal records mean equal perturbations)."""

    def perturb(self, grads, **kw):
        super().perturb(grads, **kw)
        self.last_e = [p.detach().clone() for p in self.params]


def _global_batch(step: int, kind: str = "cnn"):
    return make_batch(kind, B * WORLD, seed=100 + step)


def _make(kind: str = "cnn", **kw):
    return make_cnn(**kw) if kind == "cnn" else make_mlp(**kw)


# Per-worker BatchNorm statistics differ from the global batch's, so the modes that compare with
# single-process SAM on the concatenated batch (global, full) use the BN-free MLP.
KIND = {"local": "cnn", "micro": "cnn", "global": "mlp", "full": "mlp"}


def _ddp_worker(rank, world, mode, steps, extra):
    kind = KIND[mode]
    model = DDP(_make(kind))
    counter = CommCounter.attach(model)
    opt = RecordingSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOM)
    kwargs = dict(ascent=mode, **extra)
    if mode == "full":
        x, y = _global_batch(99, kind)
        kwargs["ascent_data"] = [(x[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B])]
    calls, es = [], []
    for step in range(steps):
        x, y = _global_batch(step, kind)
        counter.reset()
        sam_step(model, opt, CE, x[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B], **kwargs)
        calls.append((counter.calls, counter.bytes))
        es.append(opt.last_e)
    return dict(weights=[p.detach().clone() for p in model.module.parameters()],
                buffers=[b.clone() for b in model.module.buffers()], comm=calls, e=es)


def _sgd_comm_worker(rank, world):
    """A plain SGD step's gradient all-reduces (calls, bytes), per model kind."""
    out = {}
    for kind in ("cnn", "mlp"):
        model = DDP(_make(kind))
        counter = CommCounter.attach(model)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        for step in range(2):
            x, y = _global_batch(step, kind)
            counter.reset()
            opt.zero_grad()
            CE(model(x[rank * B:(rank + 1) * B]), y[rank * B:(rank + 1) * B]).mean().backward()
            opt.step()
        out[kind] = (counter.calls, counter.bytes)
    return out


def _reference(mode: str, steps: int, m: int | None = None):
    """Single-process float64 re-derivation of SPEC §2 on the concatenated global batch."""
    kind = KIND[mode]
    ref = _make(kind)
    opt = torch.optim.SGD(ref.parameters(), lr=LR, momentum=MOM)
    for step in range(steps):
        x, y = _global_batch(step, kind)
        if mode == "global":  # mini-batch SAM: one perturbation from the whole global batch
            h = ref_msam_grad(ref, CE, x, y, m=B * WORLD, variant="sam", rho=RHO)
        elif mode == "full":
            h = _ref_full(ref, x, y)
        else:  # local / micro: m-SAM with m = per-worker batch (or the micro size) over the global batch
            h = _ref_local_msam(ref, x, y, m or B)
        ref_base_step(ref, opt, h)
    return ref


def _ref_local_msam(ref, x, y, m):
    """Each worker k runs m-SAM on its shard; DDP averages the workers' descent gradients.

    BatchNorm: every worker's model copy updates running stats from its own shard; the
    reference's buffers follow rank 0 (DDP broadcasts rank 0's buffers at the next forward).
    """
    per_rank = []
    for k in reversed(range(WORLD)):  # rank 0 last so the reference keeps rank 0's buffers
        replica = ref if k == 0 else copy.deepcopy(ref)
        per_rank.append(ref_msam_grad(replica, CE, x[k * B:(k + 1) * B], y[k * B:(k + 1) * B],
                                      m=m, variant="sam", rho=RHO))
    return [sum(hs) / WORLD for hs in zip(*per_rank)]


def _ref_full(ref, x, y):
    from reference import ref_descent_grad, ref_perturbation
    xa, ya = _global_batch(99, "mlp")
    params = list(ref.parameters())
    saved_buffers = {k: v.clone() for k, v in ref.named_buffers()}
    g = torch.autograd.grad(CE(ref(xa), ya).mean(), params)  # n-SAM: mean gradient over the dataset
    with torch.no_grad():
        for k, v in ref.named_buffers():
            v.copy_(saved_buffers[k])
    e = ref_perturbation(list(g), [p.detach() for p in params], variant="sam", rho=RHO)
    per_rank = []
    for k in reversed(range(WORLD)):
        replica = ref if k == 0 else copy.deepcopy(ref)
        xs, ys = x[k * B:(k + 1) * B], y[k * B:(k + 1) * B]
        with torch.no_grad():
            replica(xs)  # the step's forward at w updates BN running stats
        saved = [p.detach().clone() for p in replica.parameters()]
        with torch.no_grad():
            for p, ei in zip(replica.parameters(), e):
                p.add_(ei)
        per_rank.append(ref_descent_grad(replica, CE, xs, ys))
        with torch.no_grad():
            for p, s in zip(replica.parameters(), saved):
                p.copy_(s)
    return [sum(hs) / WORLD for hs in zip(*per_rank)]


@pytest.fixture(scope="module")
def sgd_comm():
    return run_distributed(_sgd_comm_worker, WORLD)[0]


@pytest.mark.parametrize("mode, extra, m", [
    ("local", {}, None),
    ("micro", {"micro_batch_size": B // 2}, B // 2),
    ("micro", {"micro_batch_size": B // 4}, B // 4),
    ("global", {}, None),
    ("full", {}, None),
])
def test_modes_match_reference_and_stay_in_sync(mode, extra, m, sgd_comm):
    steps = 5
    results = run_distributed(_ddp_worker, WORLD, args=(mode, steps, extra))
    ref = _reference(mode, steps, m)
    for r in results:  # every rank, after 5 steps, equals the reference
        for p, q in zip(r["weights"], ref.parameters()):
            torch.testing.assert_close(p, q.detach(), rtol=0, atol=1e-10)
    for p, q in zip(results[0]["weights"], results[1]["weights"]):
        assert torch.equal(p, q)  # identical across ranks, bit for bit
    for b0, br in zip(results[0]["buffers"], ref.buffers()):
        torch.testing.assert_close(b0, br, rtol=0, atol=1e-10)
    # Communication, counted at the DDP comm hook (steady state, after bucket rebuild).
    calls, nbytes = results[0]["comm"][-1]
    sgd_calls, sgd_bytes = sgd_comm[KIND[mode]]
    if mode == "global":
        assert (calls, nbytes) == (2 * sgd_calls, 2 * sgd_bytes)
    elif mode != "full":
        assert (calls, nbytes) == (sgd_calls, sgd_bytes)
    # Perturbations: per-rank in local/micro modes, shared in global/full modes.
    e0, e1 = results[0]["e"][0], results[1]["e"][0]
    same = all(torch.equal(a, b) for a, b in zip(e0, e1))
    assert same == (mode in ("global", "full"))


def _accumulation_worker(rank, world, bucket_view):
    model = DDP(make_cnn(), gradient_as_bucket_view=bucket_view)
    counter = CommCounter.attach(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOM)
    comm = []
    for step in range(3):
        x, y = _global_batch(step)
        counter.reset()
        sam_step(model, opt, CE, x[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B], accumulation_steps=2)
        comm.append((counter.calls, counter.bytes))
    return dict(weights=[p.detach().clone() for p in model.module.parameters()], comm=comm)


@pytest.mark.parametrize("bucket_view", [False, True])  # grads as views of DDP's buckets: same result
def test_accumulation_with_local_ascent_matches_reference(sgd_comm, bucket_view):
    results = run_distributed(_accumulation_worker, WORLD, args=(bucket_view,))
    ref = _reference("micro", 3, m=B // 2)  # k = 2 chunks, each its own local ascent: m = b/k
    for r in results:
        for p, q in zip(r["weights"], ref.parameters()):
            torch.testing.assert_close(p, q.detach(), rtol=0, atol=1e-10)
    assert results[0]["comm"][-1] == sgd_comm["cnn"]


def _clip_worker(rank, world, clip):
    model = DDP(make_cnn())
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    x, y = _global_batch(0)
    sam_step(model, opt, CE, x[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B], clip_grad_norm=clip)
    return [p.detach().clone() for p in model.module.parameters()]


def test_clip_applies_to_the_averaged_descent_gradient():
    clip = 0.05
    results = run_distributed(_clip_worker, WORLD, args=(clip,))
    ref = make_cnn()
    x, y = _global_batch(0)
    h = _ref_local_msam(ref, x, y, B)
    norm = torch.sqrt(sum((t ** 2).sum() for t in h))
    assert norm > clip  # the clip is active
    h = [t * (clip / (norm + 1e-6)) for t in h]  # torch's clip_grad_norm_ formula, on the average
    ref_base_step(ref, torch.optim.SGD(ref.parameters(), lr=LR), h)
    for p, q in zip(results[0]["weights"] if isinstance(results[0], dict) else results[0], ref.parameters()):
        torch.testing.assert_close(p, q.detach(), rtol=0, atol=1e-10)


def _skip_worker(rank, world, use_scaler):
    torch.manual_seed(0)
    model = DDP(make_cnn(dtype=torch.float32))
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8) if use_scaler else None
    x, y = _global_batch(0)
    x, y = x.float()[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B]
    before = [p.detach().clone() for p in model.module.parameters()]
    bad = x.clone()
    if rank == 1:
        bad[0] = float("inf")  # only rank 1 sees a non-finite input
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sam_step(model, opt, CE, bad, y, scaler=scaler)
    unchanged = all(torch.equal(p, b) for p, b in zip(model.module.parameters(), before))
    scale_after_skip = scaler.get_scale() if scaler else None
    sam_step(model, opt, CE, x, y, scaler=scaler)  # a good step goes through afterwards
    finite = all(torch.isfinite(p).all() for p in model.module.parameters())
    moved = not all(torch.equal(p, b) for p, b in zip(model.module.parameters(), before))
    return dict(unchanged=unchanged, finite=finite, moved=moved, scale=scale_after_skip,
                weights=[p.detach().clone() for p in model.module.parameters()], steps=opt.num_steps)


@pytest.mark.parametrize("use_scaler", [False, True])
def test_nonfinite_on_one_rank_skips_the_step_on_every_rank(use_scaler):
    results = run_distributed(_skip_worker, WORLD, args=(use_scaler,))
    for r in results:
        assert r["unchanged"] and r["finite"] and r["moved"]
        assert r["steps"] == 2
        if use_scaler:
            assert r["scale"] == 2.0 ** 7  # the scaler backed off once, on both ranks
    for p, q in zip(results[0]["weights"], results[1]["weights"]):
        assert torch.equal(p, q)


def _bf16_worker(rank, world):
    model = DDP(make_cnn(dtype=torch.float32))
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    losses = []
    for step in range(3):
        x, y = _global_batch(step)
        loss = sam_step(model, opt, CE, x.float()[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B],
                        autocast_dtype=torch.bfloat16)
        losses.append(loss.item())
    return dict(losses=losses, weights=[p.detach().clone() for p in model.module.parameters()])


def test_bf16_autocast_runs_and_stays_in_sync():
    results = run_distributed(_bf16_worker, WORLD)
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in results)
    for p, q in zip(results[0]["weights"], results[1]["weights"]):
        assert torch.equal(p, q) and torch.isfinite(p).all()


def _static_graph_worker(rank, world):
    model = DDP(make_cnn(), static_graph=True)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=LR)
    x, y = _global_batch(0)
    try:
        sam_step(model, opt, CE, x[:B], y[:B])
    except ValueError as err:
        return str(err)
    return None


def test_static_graph_is_refused_with_a_clear_error():
    messages = run_distributed(_static_graph_worker, WORLD)
    assert all(msg and "static_graph" in msg for msg in messages)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast with GradScaler needs a CUDA device")
def test_fp16_gradscaler_on_gpu():
    model = make_cnn(dtype=torch.float32).cuda()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    scaler = torch.amp.GradScaler("cuda")
    x, y = _global_batch(0)
    for _ in range(3):
        loss = sam_step(model, opt, CE, x.float().cuda(), y.cuda(), scaler=scaler, autocast_dtype=torch.float16)
    assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in model.parameters())
