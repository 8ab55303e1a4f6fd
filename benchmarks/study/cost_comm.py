"""LookSAM's bytes under DDP: all-reduces and bytes per step, look steps and off steps, against SGD.

    python -m benchmarks.study.cost_comm     # 2 gloo ranks on this machine, ~1 min; prints and writes
                                            # benchmarks/results/study_cost_comm.json

Each rank wraps the grids' ``SmallCNN`` in DDP with :class:`~dist_sam.distributed.ddp.CommCounter`
(DDP's buckets and every reduction made beside DDP) and takes ``steps`` steps of plain SGD, of
SAM-local, and of LookSAM and look-m-SAM (``k = 5``), counting each step on its own. A step is a
look step when the model took two forwards on it (a forward hook counts them), so nothing here is
taken from the period ``k``.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn

from .plain import RESULTS_DIR

__all__ = ["count", "main"]

SGD = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
METHODS = {"sgd": None, "sam-local": dict(name="sam"), "looksam k=5": dict(name="looksam", k=5, alpha=0.3),
           "look-m-sam k=5 (m = b/4)": dict(name="looksam", k=5, alpha=0.3, micro=4)}


def _worker(rank: int, world: int, port: int, steps: int, queue) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import dist_sam
    from dist_sam.distributed.ddp import CommCounter
    from dist_sam.train.models import SmallCNN

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    out = {}
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    for name, spec in METHODS.items():
        torch.manual_seed(0)
        module = SmallCNN(10, width=32)
        model = DDP(module)
        comm = CommCounter.attach(model)
        forwards = [0]
        module.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
        if spec is None:
            opt = torch.optim.SGD(module.parameters(), **SGD)
        else:
            extra = {k: v for k, v in spec.items() if k in ("k", "alpha")}
            opt = dist_sam.create_optimizer(spec["name"], module.parameters(), base="sgd", rho=0.05, **SGD, **extra)
        rows = []
        gen = torch.Generator().manual_seed(rank)
        for _ in range(steps):
            x, y = torch.randn(16, 3, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
            comm.reset()
            forwards[0] = 0
            if spec is None:
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x), y).mean().backward()
                opt.step()
            elif "micro" in spec:
                dist_sam.sam_step(model, opt, loss_fn, x, y, ascent="micro", micro_batch_size=spec["micro"])
            else:
                dist_sam.sam_step(model, opt, loss_fn, x, y, ascent="local")
            rows.append(dict(all_reduces=comm.calls, bytes=comm.bytes, forwards=forwards[0]))
        out[name] = rows
    queue.put((rank, out))
    dist.destroy_process_group()


def count(steps: int = 10, world: int = 2) -> dict:
    """Per method and step: all-reduces, bytes and forwards of rank 0 (the ranks' counts are compared)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, steps, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    if any(results[r] != results[0] for r in results):
        raise RuntimeError("the ranks counted different collectives")
    sgd = results[0]["sgd"][0]
    summary = {}
    for name, rows in results[0].items():
        one_pass = [r for r in rows if r["forwards"] == 1]
        two = [r for r in rows if r["forwards"] > 1]
        summary[name] = dict(steps=rows, off_steps=len(one_pass), look_or_sam_steps=len(two),
                             off_step_equals_sgd=all(r["all_reduces"] == sgd["all_reduces"] and r["bytes"] == sgd["bytes"]
                                                     for r in one_pass) if one_pass else None)
    return dict(world_size=world, sgd_step=sgd, methods=summary)


def main(argv: list[str] | None = None) -> int:
    """Count, print the summary, write ``study_cost_comm.json``."""
    result = count()
    for name, s in result["methods"].items():
        kinds = sorted({(r["forwards"], r["all_reduces"], r["bytes"]) for r in s["steps"]})
        print(f"{name}: (forwards, all-reduces, bytes) per step kind {kinds}; off steps {s['off_steps']}, "
              f"off step = SGD's collectives and bytes: {s['off_step_equals_sgd']}")
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(os.path.join(RESULTS_DIR, "study_cost_comm.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
