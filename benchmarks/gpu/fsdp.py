"""GPU check, FSDP2 section: world size 1, bf16 parameters, ``resident`` (L0) and ``lean`` (L1).

    python -m benchmarks.gpu.fsdp --out $OUT            # on the GPU (NCCL), about 1 minute
    python -m benchmarks.gpu.fsdp --dry-run --out /tmp  # the same code, tiny, CPU + gloo

For each memory mode a fresh ResNet (seeded; ResNet-50 at 224 px, batch 64 on the GPU) is sharded
with ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` and takes 3 SAM-local steps on
the same batches. Checks: loss and weights finite and moved; ``lean`` equal to ``resident`` (same
arithmetic, applied at a different moment: max relative difference reported, bf16-level allowed);
peak ``torch.cuda.max_memory_allocated`` per mode (lean expected lower); img/s of 5 more steps.
Writes ``fsdp_gpu_check.json``.
"""

from __future__ import annotations

import sys
import time

import torch
from torch import nn

from ..common.procs import world_of_one
from . import section_main

__all__ = ["run", "main"]

FULL = dict(model="resnet50", image_size=224, num_classes=1000, batch_size=64, steps=3, timed=5)
DRY = dict(model="resnet18", image_size=32, num_classes=10, batch_size=4, steps=2, timed=1)


def _mode(mode: str, opts: dict, device: torch.device, batches) -> dict:
    import dist_sam
    from dist_sam.train.models import build_model
    from dist_sam.train.parallel import shard

    torch.manual_seed(0)
    model = build_model(opts["model"], num_classes=opts["num_classes"]).to(device)
    shard(model, param_dtype=torch.bfloat16)
    opt = dist_sam.create_optimizer("sam", model.parameters(), base="sgd", lr=0.1, momentum=0.9, rho=0.05)
    start = [p.full_tensor().detach().clone() for p in model.parameters()]
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses = [float(dist_sam.sam_step(model, opt, loss_fn, x, y, fsdp_memory=mode)) for x, y in batches]
    peak = torch.cuda.max_memory_allocated() if cuda else None
    weights = [p.full_tensor().detach().clone() for p in model.parameters()]
    x, y = batches[0]
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(opts["timed"]):
        dist_sam.sam_step(model, opt, loss_fn, x, y, fsdp_memory=mode)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / opts["timed"]
    return dict(losses=losses, finite=all(torch.isfinite(torch.tensor(losses))) and all(torch.isfinite(w).all() for w in weights),
                moved=any(not torch.equal(a, b) for a, b in zip(start, weights)), peak_memory_bytes=peak,
                img_per_s=opts["batch_size"] / seconds, weights=weights)


def run(dry_run: bool) -> dict:
    """Both memory modes on one process (world size 1); returns the section's JSON."""
    opts = DRY if dry_run else FULL
    cuda = torch.cuda.is_available() and not dry_run
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    with world_of_one(device):
        gen = torch.Generator().manual_seed(1)
        size, n = opts["image_size"], opts["batch_size"]
        batches = [(torch.randn(n, 3, size, size, generator=gen).to(device),
                    torch.randint(0, opts["num_classes"], (n,), generator=gen).to(device)) for _ in range(opts["steps"])]
        modes = {m: _mode(m, opts, device, batches) for m in ("resident", "lean")}
    a, b = modes["resident"].pop("weights"), modes["lean"].pop("weights")
    diff = max(((x - y).abs().max() / x.abs().max().clamp_min(1e-12)).item() for x, y in zip(a, b))
    ok = all(m["finite"] and m["moved"] for m in modes.values()) and diff < 2e-2
    peaks = [modes[m]["peak_memory_bytes"] for m in ("resident", "lean")]
    return dict(section="fsdp", device=str(torch.cuda.get_device_name(0)) if cuda else "cpu", dry_run=dry_run,
                options=opts, modes=modes, lean_vs_resident_max_rel_diff=diff,
                lean_peak_below_resident=None if None in peaks else peaks[1] < peaks[0], ok=ok)


def main(argv: list[str] | None = None) -> int:
    return section_main("fsdp", __doc__, run, "modes", argv)


if __name__ == "__main__":
    sys.exit(main())
