"""LookSAM and look-m-SAM under DeepSpeed ZeRO 0 and 2 (fp32, CPU, 2 gloo ranks) against DDP
``sam_step``; collectives counted; the refusals.

The rule runs inside ``engine.step()`` on the gradients DeepSpeed hands its base optimizer (ZeRO-2:
this rank's flat partition). An off step must make a plain engine step's collectives; a look step
a SAM step's plus one all-reduce of the plain gradient at ``w`` (ZeRO-1/2: plus two scalar sums
across the partitions).
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("deepspeed")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions",
                                                           "dist_sam_tests"))  # the cache test_deepspeed uses

import torch  # noqa: E402
from torch import nn  # noqa: E402

import dist_sam.deepspeed as dsd  # noqa: E402
from dist_utils import run_distributed  # noqa: E402
from reference import make_batch, make_mlp  # noqa: E402

pytestmark = pytest.mark.slow
CE = nn.CrossEntropyLoss(reduction="none")
BASE = dict(lr=0.1, momentum=0.9)
LOOK = dict(variant="looksam", rho=0.1, k=3, alpha=0.5)
MICRO, STEPS = 4, 5  # look steps at t = 0 and 3
CASES = {"zero0": (0, {}), "zero2": (2, {"overlap_comm": True}), "zero2-micro": (2, {"ascent": "micro"})}
_COUNTS: dict | None = None


def _count_collectives() -> None:
    import torch.distributed as dist

    for name in ("all_reduce", "reduce_scatter", "reduce_scatter_tensor", "all_gather", "all_gather_into_tensor",
                 "broadcast", "reduce"):
        fn = getattr(dist, name)

        def wrapper(*args, _fn=fn, _name=name, **kwargs):
            if _COUNTS is not None:
                entry = _COUNTS.setdefault(_name, [0, 0])
                entry[0] += 1
                entry[1] += sum(t.numel() * t.element_size() for t in list(args) + list(kwargs.values())
                                if isinstance(t, torch.Tensor))
            return _fn(*args, **kwargs)

        setattr(dist, name, wrapper)


def _config(stage, sam, zero=None):
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
            "zero_optimization": dict({"stage": stage}, **(zero or {})), "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9, "sam": sam}


def _batch(step, rank):
    return make_batch("mlp", MICRO, seed=1000 * step + rank, dtype=torch.float32)


def _ddp(sam):
    from torch.nn.parallel import DistributedDataParallel as DDP

    import dist_sam
    model = DDP(make_mlp(dtype=torch.float32))
    sam = dict(sam)
    variant, ascent, m = sam.pop("variant"), sam.pop("ascent", "local"), sam.pop("micro_batch_size", None)
    opt = dist_sam.create_optimizer(variant, model.parameters(), base="sgd", **sam, **BASE)
    for step in range(STEPS):
        x, y = _batch(step, torch.distributed.get_rank())
        dist_sam.sam_step(model, opt, CE, x, y, ascent=ascent, micro_batch_size=m)
    return model.module.state_dict()


def _ds_run(stage, sam, zero):
    engine = _engine(stage, sam, zero)
    rank = torch.distributed.get_rank()
    comm = [_counted(lambda: engine.train_step(_batch(step, rank))) for step in range(STEPS)]
    return engine, comm


def _engine(stage, sam, zero):
    model = make_mlp(dtype=torch.float32)
    engine, *_ = dsd.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), **BASE),
                                config=_config(stage, sam, zero), loss_fn=CE)
    return engine


def _counted(fn):
    global _COUNTS
    _COUNTS = {}
    fn()
    counts, _COUNTS = _COUNTS, None
    return {k: tuple(v) for k, v in counts.items()}


def _baselines(stage, zero, sam):
    """A plain engine step's and a SAM step's collectives (each counted at its second call)."""
    engine = _engine(stage, sam, zero)
    x, y = _batch(0, torch.distributed.get_rank())

    def plain():
        engine.backward(CE(engine(x), y).mean())
        engine.step()

    out = {}
    for name, fn in (("plain", plain), ("sam", lambda: engine.train_step((x, y)))):
        _counted(fn)  # warm-up: one-time set-up traffic stays out
        out[name] = _counted(fn)
    return out


def _worker(rank, world):
    _count_collectives()
    out = {}
    for name, (stage, extra) in CASES.items():
        sam = dict(LOOK, **({"ascent": "micro", "micro_batch_size": 2} if extra.get("ascent") else {}))
        zero = {k: v for k, v in extra.items() if k != "ascent"}
        ref = _ddp(sam)
        engine, comm = _ds_run(stage, sam, zero)
        ascent = dict(variant="sam", rho=0.1, **({k: sam[k] for k in ("ascent", "micro_batch_size") if k in sam}))
        diff = max((engine.module.state_dict()[k] - v).abs().max().item() for k, v in ref.items())
        out[name] = dict(diff=diff, comm=comm, base=_baselines(stage, zero, ascent),
                         n_params=sum(p.numel() for p in engine.module.parameters()))
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, world_size=2, timeout=600)


@pytest.mark.parametrize("case", list(CASES))
def test_deepspeed_equals_ddp(results, case):
    for rank in range(2):
        assert results[rank][case]["diff"] < 1e-6, (rank, results[rank][case]["diff"])


@pytest.mark.parametrize("case", list(CASES))
def test_off_steps_make_a_plain_steps_collectives_and_look_steps_one_all_reduce_more(results, case):
    out = results[0][case]
    stage = CASES[case][0]
    for t, comm in enumerate(out["comm"]):
        if t % LOOK["k"]:
            assert comm == out["base"]["plain"], t
            continue
        extra = dict(comm)
        calls, nbytes = extra.pop("all_reduce")
        sam_calls, sam_bytes = out["base"]["sam"].get("all_reduce", (0, 0))
        scalars = (2, 16 + 8) if stage else (0, 0)  # ZeRO-1/2: <g_s, g>, ||g||^2 and ||g_v||^2 across partitions
        assert (calls - sam_calls, nbytes - sam_bytes) == (1 + scalars[0], out["n_params"] * 4 + scalars[1]), t
        assert extra == {k: v for k, v in out["base"]["sam"].items() if k != "all_reduce"}, t


@pytest.mark.parametrize("change, match", [
    (dict(zero_optimization={"stage": 3}), "stage=3"),
    (dict(gradient_accumulation_steps=2), "gradient_accumulation_steps=2"),
    (dict(bf16={"enabled": True}), "bf16"),
    (dict(sam=dict(LOOK, ascent="global")), "sam.ascent"),
    (dict(sam=dict(LOOK, interval=2)), "sam.interval"),
    (dict(sam=dict(LOOK, alpha=2.0)), "sam.alpha"),
])
def test_refusals_name_the_field(change, match):
    with pytest.raises(ValueError, match=match):
        dsd.check_config({**_config(0, LOOK), **change})
