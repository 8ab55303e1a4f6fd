"""LookSAM and look-m-SAM on 2 real gloo processes: DDP against the float64 re-derivation of
``test_looksam.py``, FSDP2 against DDP; replicas bit-equal, collectives counted.

An off step must make SGD's collectives (calls and bytes); a look step SAM's plus one all-reduce
of the plain gradient at ``w`` (FSDP2 also sums two float64 scalars, ``<g_s, g>, ||g||^2`` and
``||g_v||^2``, across its shards). One spawn runs every case.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_utils import run_distributed
from reference import make_batch, make_mlp
from test_looksam import ref_looksam

pytestmark = pytest.mark.slow

CE = nn.CrossEntropyLoss(reduction="none")
WORLD, B, STEPS, K = 2, 8, 5, 3  # look steps at t = 0 and 3
OPT = dict(base="sgd", lr=0.1, momentum=0.9, rho=0.1, k=K, alpha=0.5)
MODES = {"local": None, "micro": 2}


def _batch(step, rank):
    x, y = make_batch("mlp", WORLD * B, seed=500 + step)
    return x[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B]


class _Counter:
    """Calls and bytes of the torch.distributed collectives made while counting (FSDP2 and ours)."""

    KINDS = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather_single",
             "reduce_scatter_single")

    def __init__(self):
        self.counts = None
        for kind in self.KINDS:
            fn = getattr(dist, kind, None)
            if fn is not None:
                setattr(dist, kind, self._wrap(kind, fn))

    def _wrap(self, kind, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self.counts is not None:
                size = max((t.numel() * t.element_size() for t in list(args) + list(kwargs.values())
                            if isinstance(t, torch.Tensor)), default=0)
                entry = self.counts.setdefault(kind, [0, 0])
                entry[0] += 1
                entry[1] += size
            return fn(*args, **kwargs)
        return counted

    def step(self, fn):
        self.counts = {}
        fn()
        counts, self.counts = self.counts, None
        return {k: tuple(v) for k, v in sorted(counts.items())}


def _ddp_cases(rank):
    import dist_sam
    from dist_sam.distributed import CommCounter
    out = {}
    for mode, m in MODES.items():
        model = DDP(make_mlp(0))
        counter = CommCounter.attach(model)
        opt = dist_sam.create_optimizer("looksam", model.parameters(), **OPT)
        comm = []
        for step in range(STEPS):
            counter.reset()
            x, y = _batch(step, rank)
            dist_sam.sam_step(model, opt, CE, x, y, ascent=mode, micro_batch_size=m)
            comm.append((counter.calls, counter.bytes))
        out[mode] = dict(weights=[p.detach().clone() for p in model.module.parameters()], comm=comm,
                         g_v=[v.clone() for v in opt.g_v])
    for name in ("sgd", *MODES):  # the baselines' counts on the same model: SGD, SAM-local, m-SAM
        model = DDP(make_mlp(0))
        counter = CommCounter.attach(model)
        opt = dist_sam.create_optimizer("sam", model.parameters(), base="sgd", lr=0.1, rho=0.1)
        x, y = _batch(0, rank)
        if name == "sgd":
            dist_sam.base_step(model, opt, CE, x, y)
        else:
            dist_sam.sam_step(model, opt, CE, x, y, ascent=name, micro_batch_size=MODES[name])
        out["sam-" + name if name != "sgd" else name] = (counter.calls, counter.bytes)
    return out


def _ddp_rho0_and_resume(rank):
    """rho = 0 against DDP SGD (bit for bit), and a state_dict resume after an off step (bit for bit)."""
    import io

    import dist_sam
    model, plain = DDP(make_mlp(0)), DDP(make_mlp(0))
    opt = dist_sam.create_optimizer("looksam", model.parameters(), **dict(OPT, rho=0.0))
    sgd = torch.optim.SGD(plain.parameters(), lr=OPT["lr"], momentum=OPT["momentum"])
    for step in range(4):
        x, y = _batch(step, rank)
        dist_sam.sam_step(model, opt, CE, x, y)
        sgd.zero_grad()
        CE(plain(x), y).mean().backward()
        sgd.step()
    rho0 = all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()))

    model = DDP(make_mlp(0))
    opt = dist_sam.create_optimizer("looksam", model.parameters(), **OPT)
    run = lambda m, o, steps: [dist_sam.sam_step(m, o, CE, *_batch(t, rank)) for t in steps]  # noqa: E731
    run(model, opt, range(2))
    buffer = io.BytesIO()
    torch.save({"model": model.module.state_dict(), "opt": opt.state_dict()}, buffer)
    run(model, opt, range(2, STEPS))
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = DDP(make_mlp(7))
    resumed.module.load_state_dict(saved["model"])
    opt2 = dist_sam.create_optimizer("looksam", resumed.parameters(), **OPT)
    opt2.load_state_dict(saved["opt"])
    run(resumed, opt2, range(2, STEPS))
    resume = all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))
    return dict(rho0=rho0, resume=resume)


def _shard(model):
    from torch.distributed.fsdp import fully_shard
    for unit in (model[0], model[2]):
        fully_shard(unit)
    return fully_shard(model)


def _fsdp_cases(rank, counter):
    import dist_sam
    out = {}
    for mode, m in MODES.items():
        model = _shard(make_mlp(0))
        opt = dist_sam.create_optimizer("looksam", model.parameters(), **OPT)
        comm = []
        for step in range(STEPS):
            x, y = _batch(step, rank)
            comm.append(counter.step(lambda: dist_sam.sam_step(model, opt, CE, x, y, ascent=mode, micro_batch_size=m)))
        out[mode] = dict(weights=[p.full_tensor().detach().clone() for p in model.parameters()], comm=comm)
    for name in ("sgd", *MODES):
        model = _shard(make_mlp(0))
        opt = dist_sam.create_optimizer("sam", model.parameters(), base="sgd", lr=0.1, rho=0.1)
        x, y = _batch(0, rank)
        if name == "sgd":
            out[name] = counter.step(lambda: dist_sam.base_step(model, opt, CE, x, y))
        else:
            out["sam-" + name] = counter.step(lambda: dist_sam.sam_step(model, opt, CE, x, y, ascent=name,
                                                                         micro_batch_size=MODES[name]))
    return out


def _worker(rank, world):
    counter = _Counter()  # before FSDP binds anything
    return dict(ddp=_ddp_cases(rank), fsdp=_fsdp_cases(rank, counter), ddp_checks=_ddp_rho0_and_resume(rank))


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, world_size=WORLD)


def _is_look(t):
    return t % K == 0


@pytest.mark.parametrize("mode", list(MODES))
def test_ddp_equals_the_float64_reference_and_replicas_are_bit_equal(results, mode):
    batches = [[_batch(t, r) for r in range(WORLD)] for t in range(STEPS)]
    mean = lambda per_rank: [sum(ts) / WORLD for ts in zip(*per_rank)]  # noqa: E731 - DDP's average
    ref = ref_looksam(make_mlp(0), batches, rho=OPT["rho"], k=K, alpha=OPT["alpha"], lr=OPT["lr"],
                      momentum=OPT["momentum"], m=MODES[mode], gather=mean)
    r0, r1 = results[0]["ddp"][mode], results[1]["ddp"][mode]
    for a, b in zip(r0["weights"], ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert all(torch.equal(a, b) for a, b in zip(r0["weights"], r1["weights"]))
    assert all(torch.equal(a, b) for a, b in zip(r0["g_v"], r1["g_v"]))  # built from synced quantities


@pytest.mark.parametrize("mode", list(MODES))
def test_ddp_off_steps_move_sgds_bytes_and_look_steps_one_all_reduce_more(results, mode):
    out = results[0]["ddp"]
    n_params = sum(p.numel() for p in make_mlp(0).parameters())
    sgd_calls, sgd_bytes = out["sgd"]
    assert out["sam-" + mode] == out["sgd"]  # SAM-local and m-SAM: SGD's one reduction
    for t, (calls, nbytes) in enumerate(out[mode]["comm"]):
        if _is_look(t):
            assert (calls, nbytes) == (sgd_calls + 1, sgd_bytes + n_params * 8), t  # + the plain gradient, float64
        else:
            assert (calls, nbytes) == (sgd_calls, sgd_bytes), t


@pytest.mark.parametrize("mode", list(MODES))
def test_fsdp2_equals_ddp(results, mode):
    for rank in range(WORLD):
        for a, b in zip(results[rank]["fsdp"][mode]["weights"], results[0]["ddp"][mode]["weights"]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("mode", list(MODES))
def test_fsdp2_off_steps_are_plain_steps_and_look_steps_add_one_all_reduce(results, mode):
    out = results[0]["fsdp"]
    n_params = sum(p.numel() for p in make_mlp(0).parameters())
    for t, comm in enumerate(out[mode]["comm"]):
        if not _is_look(t):
            assert comm == out["sgd"], t
            continue
        sam = out["sam-" + mode]  # the SAM step of the same ascent mode
        extra = {k: (c - sam.get(k, (0, 0))[0], n - sam.get(k, (0, 0))[1]) for k, (c, n) in comm.items()}
        # the plain gradient (whole, float64) and two float64 scalar sums (2 and 1 values) across shards
        assert extra.pop("all_reduce") == (3, n_params * 8 + 16 + 8), t
        assert all(v == (0, 0) for v in extra.values()), (t, extra)


def test_ddp_rho_zero_is_sgd_and_resume_is_bit_equal(results):
    for rank in range(WORLD):
        assert results[rank]["ddp_checks"] == dict(rho0=True, resume=True), rank
