"""RW-SAM's overhead over SAM: step-time ratios at world size 1 and 2 on CPU.

    python -m benchmarks.throughput.rwsam                      # ResNet-18 (CIFAR stem), 32px, batch 32/worker
    python -m benchmarks.throughput.rwsam --arch plain --steps 30

Measures ``RW-SAM(fd)/SAM`` and ``RW-SAM(last_layer)/SAM`` (targets 1.10 and 1.03; SPEC.md §5
counts 7F/6F for ``fd``, the paper measures 1.12 on ResNet-18) and writes
``benchmarks/results/rwsam_overhead.json``. World size 2 runs 2 gloo processes
(``torch.multiprocessing`` spawn), 1 thread each; world size 1 runs one process with 1 thread.

The variants are interleaved: every round times one step of each, in a rotating order, so that
load from other processes on the machine hits all of them alike; a step's time is the slowest
rank's (ranks start each step together after a barrier), and a ratio is a ratio of medians over
``--steps`` rounds after ``--warmup`` rounds. ``mu`` is fixed at 1e-4 (the paper's ResNet-18 value)
so that no calibration runs inside the timed steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from ..common import output
from ..common.procs import spawn
from ..common.timing import rotated

__all__ = ["VARIANTS", "TARGETS", "build_resnet18", "measure", "main"]

VARIANTS = {  # name -> create_optimizer(name, ...) arguments
    "sam": ("sam", {}),
    "rwsam-fd": ("rwsam", dict(estimator="fd", mu=1e-4)),
    "rwsam-last_layer": ("rwsam", dict(estimator="last_layer")),
}
TARGETS = {"rwsam-fd/sam": 1.10, "rwsam-last_layer/sam": 1.03}


def build_resnet18(arch: str, num_classes: int = 10) -> nn.Module:
    """torchvision ResNet-18; ``cifar`` swaps the stem for a 3x3 stride-1 conv without max-pool."""
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    if arch == "cifar":
        model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif arch != "plain":
        raise ValueError(f"arch must be 'cifar' or 'plain', got {arch!r}")
    return model


def _setup(cfg: dict, world: int):
    """One model and optimizer per variant (same initial weights), and the rounds' batches."""
    import dist_sam
    from torch.nn.parallel import DistributedDataParallel as DDP

    runs = {}
    for name, (opt_name, kw) in VARIANTS.items():
        torch.manual_seed(0)
        model = build_resnet18(cfg["arch"])
        model = DDP(model) if world > 1 else model
        opt = dist_sam.create_optimizer(opt_name, model.parameters(), lr=0.01, momentum=0.9, rho=0.05, **kw)
        runs[name] = (model, opt)
    gen = torch.Generator().manual_seed(1 + (dist.get_rank() if world > 1 else 0))
    b = cfg["batch_size"]
    data = [(torch.randn(b, 3, 32, 32, generator=gen), torch.randint(0, 10, (b,), generator=gen)) for _ in range(4)]
    return runs, data


def _rounds(cfg: dict, world: int) -> dict[str, list[float]]:
    """Per-variant step times (this rank's), warm-up excluded."""
    import dist_sam

    runs, data = _setup(cfg, world)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    names = list(VARIANTS)
    times = {n: [] for n in names}
    for r in range(cfg["warmup"] + cfg["steps"]):
        x, y = data[r % len(data)]
        for name in rotated(names, r):  # no variant always goes first
            model, opt = runs[name]
            if world > 1:
                dist.barrier()
            start = time.perf_counter()
            dist_sam.sam_step(model, opt, loss_fn, x, y)
            elapsed = time.perf_counter() - start
            if r >= cfg["warmup"]:
                times[name].append(elapsed)
    return times


def _slowest_rank(times: dict[str, list[float]]) -> dict[str, list[float]]:
    out = {}
    for name, values in times.items():
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out[name] = t.tolist()
    return out


def _rank_times(rank: int, world: int, cfg: dict) -> dict[str, list[float]]:
    return _slowest_rank(_rounds(cfg, world))


def measure(cfg: dict, world: int) -> dict[str, list[float]]:
    """Step times per variant at ``world`` processes (the slowest rank's, per step)."""
    if world == 1:
        torch.set_num_threads(1)
        return _rounds(cfg, 1)
    return spawn(_rank_times, world, cfg, timeout_s=cfg["timeout"])[0]


def _summary(times: dict[str, list[float]]) -> dict:
    med = {n: statistics.median(v) for n, v in times.items()}
    ratios = {f"{n}/sam": med[n] / med["sam"] for n in med if n != "sam"}
    return dict(median_step_s=med, ratios=ratios, step_times_s=times,
                targets_met={k: ratios[k] <= t for k, t in TARGETS.items()})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput.rwsam", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="cifar", choices=("cifar", "plain"))
    p.add_argument("--batch-size", type=int, default=32, help="per worker")
    p.add_argument("--steps", type=int, default=20, help="timed rounds (>= 20 for the record)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--out", default=os.path.join(output.RESULTS_DIR, "rwsam_overhead.json"))
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = dict(arch=args.arch, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, timeout=args.timeout)
    result = dict(config=dict(cfg, model=f"resnet18-{args.arch}", image_size=32, mu=1e-4, variants=list(VARIANTS)),
                  machine=output.machine(threads_per_process=1), targets=TARGETS, world_sizes={})
    for world in args.world_sizes:
        begin = time.time()
        summary = _summary(measure(cfg, world))
        summary["wall_s"] = round(time.time() - begin, 1)
        result["world_sizes"][str(world)] = summary
        print(f"world size {world}: " + ", ".join(f"{k} = {v:.3f}" for k, v in summary["ratios"].items())
              + "  (medians: " + ", ".join(f"{k} {v:.3f}s" for k, v in summary["median_step_s"].items()) + ")",
              flush=True)
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    output.write_json(result, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
