"""``make demo``: 2-process DDP training with device-local SAM on generated data (gloo, CPU)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import dist_sam

__all__ = ["main", "worker"]


def worker(steps: int = 60) -> None:
    """One rank: a small MLP on a generated 10-class problem, local SAM, loss printed by rank 0."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(0)  # the same data on every rank; each takes its shard
    centers = torch.randn(10, 32, generator=gen) * 0.5
    labels = torch.randint(0, 10, (4096,), generator=gen)
    inputs = centers[labels] + torch.randn(4096, 32, generator=gen)
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)))
    opt = dist_sam.create_optimizer("sam", model.parameters(), lr=0.1, momentum=0.9, rho=0.05)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    b = 64
    for step in range(steps):
        start = (step * world + rank) * b % (4096 - b)
        loss = dist_sam.sam_step(model, opt, loss_fn, inputs[start:start + b], labels[start:start + b])
        if rank == 0 and step % 10 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    if "RANK" in os.environ:
        worker()
        return 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "dist_sam.train.demo"]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})


if __name__ == "__main__":
    sys.exit(main())
