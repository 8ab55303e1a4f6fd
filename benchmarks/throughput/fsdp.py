"""FSDP2 SAM at world size 2 on CPU: step time, collectives, bytes and peak memory (the ``fsdp`` preset).

    python -m benchmarks.throughput.fsdp              # ResNet-18, 32 px, batch 32/worker, units per stage
    python -m benchmarks.throughput.fsdp --quick      # tiny sizes (the tests)

Two gloo processes, one thread each. Variants, interleaved round by round on the same batches:
plain FSDP2 (SGD), SAM-local ``resident`` (L0) and ``lean`` (L1), SAM-global under FSDP2, and
plain DDP and DDP local SAM on a replica of the same model. Per variant: the median over rounds of
the slower rank's step time, ratios to plain FSDP2 and to DDP local SAM, the collectives of one
steady-state step (calls and bytes of all-gather, reduce-scatter, all-reduce; DDP's gradient
all-reduces through its comm hook) and the peak extra memory of one step (``PeakMemory``, measured
in a second, untimed pair of processes whose glibc returns every freed tensor to the OS).
Writes ``benchmarks/results/fsdp.json`` and ``fsdp.png``. Targets (issue 11): SAM-local bytes <=
plain FSDP2's; SAM-local step <= 2.1x plain FSDP2; lean's peak below resident's by one gradient.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

import dist_sam
from dist_sam.distributed.ddp import CommCounter
from dist_sam.train.models import build_model
from dist_sam.train.parallel import shard

from ..common import output
from ..common.procs import spawn
from ..common.timing import PeakMemory, rotated
from .config import RESULTS_DIR

__all__ = ["VARIANTS", "TARGETS", "run", "main"]

VARIANTS = ("fsdp-sgd", "fsdp-sam-local", "fsdp-sam-lean", "fsdp-sam-global", "ddp-sgd", "ddp-sam-local")
TARGETS = {"sam_local_step_vs_fsdp": 2.1, "sam_local_bytes_vs_fsdp": 1.0}
KINDS = ("all_gather", "reduce_scatter", "all_reduce")


class _Collectives:
    """Counts FSDP2's collectives (``dist.all_gather_single`` / ``reduce_scatter_single`` / ``all_reduce``)."""

    def __init__(self) -> None:
        self.reset()
        for kind, name in zip(KINDS, ("all_gather_single", "reduce_scatter_single", "all_reduce")):
            setattr(dist, name, self._wrap(kind, getattr(dist, name)))

    def reset(self) -> None:
        self.calls, self.bytes = dict.fromkeys(KINDS, 0), dict.fromkeys(KINDS, 0)

    def _wrap(self, kind, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            sizes = [t.numel() * t.element_size() for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
            self.calls[kind] += 1
            self.bytes[kind] += max(sizes, default=0)
            return fn(*args, **kwargs)
        return counted


def _model(cfg: dict) -> nn.Module:
    if cfg["model"] == "tiny":  # --quick: two units and a root
        return nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(3 * cfg["image_size"] ** 2, 32), nn.ReLU()),
                             nn.Linear(32, cfg["num_classes"]))
    if cfg["model"] == "mlp8":  # eight equal 1024-wide units: parameters dominate, units balanced
        blocks = [nn.Sequential(nn.Linear(1024, 1024), nn.ReLU()) for _ in range(8)]
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * cfg["image_size"] ** 2, 1024), *blocks,
                             nn.Linear(1024, cfg["num_classes"]))
    return build_model(cfg["model"], num_classes=cfg["num_classes"])


def _steps(cfg: dict, rank: int) -> dict:
    """One step function per variant, each on its own copy of the same seeded model."""
    torch.manual_seed(0)
    base = _model(cfg)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    opt_kw = dict(lr=0.05, momentum=0.9)
    steps = {}
    for name in VARIANTS:
        model = copy.deepcopy(base)
        engine, _, variant = name.partition("-")
        if engine == "fsdp":
            model = shard(model)
        else:
            model = nn.parallel.DistributedDataParallel(model)
            CommCounter.attach(model)  # DDP's all-reduces then run through dist.all_reduce, which is counted
        if variant == "sgd":
            opt = torch.optim.SGD(model.parameters(), **opt_kw)

            def step(x, y, model=model, opt=opt):
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x), y).mean().backward()
                opt.step()
        else:
            opt = dist_sam.create_optimizer("sam", model.parameters(), base="sgd", rho=0.05, **opt_kw)
            kw = {"fsdp_memory": "lean"} if variant == "sam-lean" else {}
            ascent = "global" if variant == "sam-global" else "local"

            def step(x, y, model=model, opt=opt, kw=kw, ascent=ascent):
                dist_sam.sam_step(model, opt, loss_fn, x, y, ascent=ascent, **kw)
        steps[name] = step
    return steps


def _measure(rank: int, world_size: int, cfg: dict) -> dict:
    collectives = _Collectives()
    steps = _steps(cfg, rank)
    gen = torch.Generator().manual_seed(1000 + rank)
    size = cfg["image_size"]
    x = torch.randn(cfg["batch_size"], 3, size, size, generator=gen)
    y = torch.randint(0, cfg["num_classes"], (cfg["batch_size"],), generator=gen)
    probe = PeakMemory(torch.device("cpu"))
    out = {n: {"times": []} for n in VARIANTS}
    for name in VARIANTS:  # warm-up: the first step allocates the optimizer state
        for i in range(cfg["warmup"]):
            steps[name](x, y)
        collectives.reset()
        out[name]["peak_memory_bytes"] = probe.measure(lambda: steps[name](x, y))
        out[name]["calls"], out[name]["bytes"] = dict(collectives.calls), dict(collectives.bytes)
    for r in range(cfg["rounds"]):
        for name in rotated(VARIANTS, r):
            dist.barrier()
            start = time.perf_counter()
            steps[name](x, y)
            out[name]["times"].append(time.perf_counter() - start)
    return out


def _summarize(cfg: dict, ranks: list[dict]) -> dict:
    """Per variant: median over rounds of the slower rank, ratios, rank 0's collectives, max peak."""
    rows = {}
    for name in VARIANTS:
        slowest = [max(t) for t in zip(*(r[name]["times"] for r in ranks))]
        rows[name] = {"step_s": statistics.median(slowest), "calls": ranks[0][name]["calls"],
                      "bytes": ranks[0][name]["bytes"], "total_bytes": sum(ranks[0][name]["bytes"].values()),
                      "peak_memory_bytes": max((r[name]["peak_memory_bytes"] or 0) for r in ranks)}
    for row in rows.values():
        row["step_vs_fsdp_sgd"] = row["step_s"] / rows["fsdp-sgd"]["step_s"]
        row["step_vs_ddp_sam_local"] = row["step_s"] / rows["ddp-sam-local"]["step_s"]
        row["bytes_vs_fsdp_sgd"] = row["total_bytes"] / rows["fsdp-sgd"]["total_bytes"]
    local, lean = rows["fsdp-sam-local"], rows["fsdp-sam-lean"]
    grad_bytes = cfg["param_bytes"]
    checks = {
        "sam_local_bytes_vs_fsdp": local["bytes_vs_fsdp_sgd"],
        "sam_local_bytes_ok": local["bytes_vs_fsdp_sgd"] <= TARGETS["sam_local_bytes_vs_fsdp"],
        "sam_local_step_vs_fsdp": local["step_vs_fsdp_sgd"],
        "sam_local_step_ok": local["step_vs_fsdp_sgd"] <= TARGETS["sam_local_step_vs_fsdp"],
        "lean_saving_bytes": local["peak_memory_bytes"] - lean["peak_memory_bytes"],
        "one_gradient_bytes": grad_bytes,
        "lean_saving_ok": local["peak_memory_bytes"] - lean["peak_memory_bytes"] >= grad_bytes,
    }
    method = PeakMemory(torch.device("cpu")).method
    return {"config": cfg, "variants": rows, "checks": checks,
            "memory_method": f"{method}, in a separate untimed run with {MEMORY_ENV}" if method else None}


#: glibc: every allocation of 64 KiB or more gets its own mapping, returned to the OS when freed, so
#: the peak-RSS mark follows the live tensors (the default heap keeps freed chunks and fragments).
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run(cfg: dict) -> dict:
    """Timing and collectives from one pair of processes, peak memory from a second pair that runs
    with :data:`MEMORY_ENV` (it slows allocation down, so it is not timed)."""
    timed = _run_pair(cfg)
    saved = {k: os.environ.get(k) for k in MEMORY_ENV}
    os.environ.update(MEMORY_ENV)
    try:
        memory = _run_pair(dict(cfg, rounds=1))
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    for name in VARIANTS:
        for t, m in zip(timed, memory):
            t[name]["peak_memory_bytes"] = m[name]["peak_memory_bytes"]
    return _summarize(cfg, timed)


def _run_pair(cfg: dict) -> list[dict]:
    return spawn(_measure, 2, cfg, timeout_s=cfg["timeout_s"])


def _plot(result: dict, path: str) -> None:
    plt = output.pyplot()
    names = list(result["variants"])
    rows = [result["variants"][n] for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, label in zip(axes, ("step_vs_fsdp_sgd", "total_bytes", "peak_memory_bytes"),
                              ("step time / plain FSDP2", "collective bytes per step (MB)", "peak extra memory (MB)")):
        values = [r[key] / (1e6 if key != "step_vs_fsdp_sgd" else 1) for r in rows]
        ax.barh(names, values, color=["#888" if "sgd" in n else "#2a6" for n in names])
        ax.set_xlabel(label)
        ax.invert_yaxis()
    axes[0].axvline(TARGETS["sam_local_step_vs_fsdp"], color="r", ls="--", lw=1)
    fig.suptitle(f"FSDP2 SAM, world size 2, {result['config']['model']} {result['config']['image_size']}px, "
                 f"batch {result['config']['batch_size']}/worker (CPU, gloo)")
    output.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput.fsdp", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=RESULTS_DIR)
    p.add_argument("--quick", action="store_true", help="tiny model and few rounds (a smoke test)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--model", default="resnet18", choices=("resnet18", "resnet50", "mlp8"),
                   help="mlp8: eight equal units, where parameters dominate the memory")
    args = p.parse_args(argv)
    cfg = dict(model=args.model, image_size=32, batch_size=32, num_classes=10, warmup=2, rounds=12, timeout_s=1800)
    if args.quick:
        cfg.update(model="tiny", image_size=8, batch_size=8, warmup=1, rounds=2, timeout_s=300)
    if args.rounds:
        cfg["rounds"] = args.rounds
    cfg["param_bytes"] = sum(p.numel() * p.element_size() for p in _model(cfg).parameters())  # one gradient
    result = run(cfg)
    name = "fsdp_quick" if args.quick else ("fsdp" if args.model == "resnet18" else f"fsdp_{args.model}")
    output.write_json(result, os.path.join(args.out, f"{name}.json"))
    _plot(result, os.path.join(args.out, f"{name}.png"))
    for n, r in result["variants"].items():
        print(f"{n:16s} step {r['step_vs_fsdp_sgd']:.2f}x FSDP-SGD  {r['step_vs_ddp_sam_local']:.2f}x DDP-SAM  "
              f"bytes {r['total_bytes'] / 1e6:7.2f} MB ({r['bytes_vs_fsdp_sgd']:.2f}x)  "
              f"peak {r['peak_memory_bytes'] / 1e6:7.1f} MB  calls {r['calls']}")
    print(json.dumps(result["checks"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
