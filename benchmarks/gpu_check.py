"""The lent-GPU check (``benchmarks/gpu_check.sh``): correctness, then img/s, then DALI decode.

    OUT=/tmp/out bash benchmarks/gpu_check.sh                  # on the GPU machine (<= 8 minutes)
    python -m benchmarks.gpu_check --dry-run --out /tmp/out     # the same code, tiny, on CPU

Sections, each written to ``$OUT/gpu_check.json`` as soon as it finishes (a timeout keeps the
finished ones):

1. ``correctness``: for SGD, SAM-local, RW-SAM ``fd`` and RW-SAM ``last_layer``, a fresh
   ResNet-50 takes 3 steps at lr 0.1 (224px, bf16 autocast, channels_last, batch 256); the loss
   and every weight must stay finite and the weights must move. Timing runs only if all pass.
2. ``throughput``: ``benchmarks.harness.measure`` on one model (no DDP, world size 1), the variants
   interleaved, median step time of 20 steps after warm-up, img/s, peak
   ``torch.cuda.max_memory_allocated`` over the step; ratios against SGD and SAM-local.
3. ``dali``: ``dist-sam make-demo-data --synthetic`` JPEGs decoded by the library's DALI loader
   (``decoders.image_random_crop`` on ``device="mixed"``, i.e. nvJPEG), img/s after one warm-up
   epoch. ``--dry-run`` runs the CPU pipeline instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any

import torch

__all__ = ["check_correctness", "time_variants", "dali_throughput", "main"]

SCHEMA = "dist-sam-gpu-check/1"
VARIANTS = ("sgd", "sam-local", "rwsam-fd", "rwsam-last_layer")
FULL = dict(model="resnet50", image_size=224, num_classes=1000, batch_size=256, steps=20, warmup=3,
            dali_images=3072, dali_image_size=320, dali_batch=256, dali_threads=8, dali_epochs=4)
DRY = dict(model="small_cnn", image_size=32, num_classes=10, batch_size=8, steps=2, warmup=1,
           dali_images=100, dali_image_size=48, dali_batch=8, dali_threads=2, dali_epochs=2)


def _bench_config(opts: dict, device: str, **extra: Any):
    from .config import BenchConfig

    return BenchConfig(name="gpu_check", model=opts["model"], image_size=opts["image_size"], num_classes=opts["num_classes"],
                       batch_size=opts["batch_size"], world_sizes=(1,), threads=max(1, torch.get_num_threads()), variants=VARIANTS,
                       warmup=opts["warmup"], steps=opts["steps"], steps_per_round=max(1, opts["steps"] // 4), device=device,
                       autocast_dtype="bfloat16", channels_last=True, quick=opts["steps"] < 20, **extra)


def check_correctness(opts: dict, device: str) -> dict[str, Any]:
    """3 steps at lr 0.1 per variant on a fresh model: finite loss, finite and moved weights."""
    from .harness import make_step, available_variants, parse_variant
    from dist_sam.train.models import build_model

    cfg = _bench_config(opts, device, lr=0.1)
    names, skipped = available_variants(VARIANTS)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=gen).to(device, memory_format=torch.channels_last)
    y = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=gen).to(device)
    out: dict[str, Any] = {"skipped": skipped}
    for name in names:
        torch.manual_seed(0)
        model = build_model(cfg.model, num_classes=cfg.num_classes, channels_last=True).to(device)
        before = [p.detach().clone() for p in model.parameters()]
        step, _ = make_step(parse_variant(name, cfg.batch_size, 1, cfg), model, cfg)
        losses = [float(step(x, y)) for _ in range(3)]
        finite_w = all(bool(torch.isfinite(p).all()) for p in model.parameters())
        moved = any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
        out[name] = dict(losses=losses, finite_loss=all(map(lambda v: v == v and abs(v) != float("inf"), losses)),
                         finite_weights=finite_w, weights_moved=moved)
        out[name]["ok"] = out[name]["finite_loss"] and finite_w and moved
        del model, before
    out["ok"] = all(v["ok"] for k, v in out.items() if isinstance(v, dict) and "ok" in v)
    return out


def time_variants(opts: dict, device: str) -> dict[str, Any]:
    """Interleaved timing of the variants on one model (``benchmarks.harness.measure``, no DDP)."""
    from .harness import measure

    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    cfg = _bench_config(opts, device)
    raw = measure(cfg, ddp=False)
    rows = {}
    for name, v in raw["variants"].items():
        median = statistics.median(v["times"])
        rows[name] = dict(step_time_ms=1e3 * median, img_per_s=cfg.batch_size / median, n=len(v["times"]), finite=v["finite"],
                          peak_memory_mb=None if v["peak_memory_bytes"] is None else v["peak_memory_bytes"] / 2**20)
    ratios = {}
    for a, b in (("sam-local", "sgd"), ("rwsam-fd", "sam-local"), ("rwsam-last_layer", "sam-local")):
        if a in rows and b in rows:
            ratios[f"{a}/{b}"] = rows[a]["step_time_ms"] / rows[b]["step_time_ms"]
    return dict(config=dataclasses.asdict(cfg), variants=rows, ratios=ratios, skipped=raw["skipped"], memory_method=raw["memory_method"])


def dali_throughput(opts: dict, device: str, workdir: str) -> dict[str, Any]:
    """Decode generated JPEGs through ``dist_sam.data``'s DALI loader; img/s after a warm-up epoch."""
    from dist_sam.data import DataConfig, build_loader
    from dist_sam.data.demo import make_synthetic

    root = os.path.join(workdir, "synthetic_jpegs")
    t0 = time.perf_counter()
    make_synthetic(root, opts["dali_images"], image_size=opts["dali_image_size"], seed=0, force=True)
    generate_s = time.perf_counter() - t0
    cfg = DataConfig(root=root, backend="dali", image_size=opts["image_size"], batch_size=opts["dali_batch"],
                     num_workers=opts["dali_threads"],
                     channels_last=True, device=device, drop_last=True, validate_files=False)
    train = build_loader(cfg, 0, 1).train
    epochs = []
    for epoch in range(opts["dali_epochs"]):
        train.set_epoch(epoch)
        start, n = time.perf_counter(), 0
        for batch in train:
            n += batch[0].shape[0]
            last = batch[0]
        if device == "cuda":
            torch.cuda.synchronize()
        epochs.append(dict(images=n, seconds=time.perf_counter() - start))
    timed = epochs[1:] or epochs
    return dict(decode="mixed (nvJPEG)" if device == "cuda" else "cpu", images=opts["dali_images"], source_side_px=opts["dali_image_size"],
                output=list(last.shape), output_dtype=str(last.dtype), threads=opts["dali_threads"], generate_s=generate_s, epochs=epochs,
                img_per_s=sum(e["images"] for e in timed) / sum(e["seconds"] for e in timed))


def _machine(device: str) -> dict[str, Any]:
    info = dict(device=device, torch=torch.__version__, cpu_count=os.cpu_count(), threads=torch.get_num_threads())
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gb=p.total_memory / 2**30, capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    try:
        import nvidia.dali

        info["dali"] = nvidia.dali.__version__
    except ImportError:
        info["dali"] = None
    return info


def main(argv: list[str] | None = None) -> int:
    """Run the sections in order, rewriting the JSON after each; exit 1 if any failed."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="output folder (default $OUT)")
    p.add_argument("--dry-run", action="store_true", help="tiny model and data on CPU: checks the script, not the GPU")
    p.add_argument("--skip-dali", action="store_true")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("gpu_check: no CUDA device; use --dry-run to exercise the script on CPU", file=sys.stderr)
        return 2
    device, opts = ("cuda", FULL) if cuda else ("cpu", DRY)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_check.json")
    result: dict[str, Any] = dict(schema=SCHEMA, dry_run=args.dry_run, started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                  machine=_machine(device), options=opts, errors={})
    sections = [("correctness", lambda: check_correctness(opts, device)), ("throughput", lambda: time_variants(opts, device))]
    workdir = tempfile.mkdtemp(prefix="gpu_check_jpegs_")
    if not args.skip_dali:
        sections.append(("dali", lambda: dali_throughput(opts, device, workdir)))
    t_start = time.perf_counter()
    for name, run in sections:
        if name == "throughput" and not result.get("correctness", {}).get("ok"):
            result["errors"][name] = "skipped: the correctness check failed"
            continue
        t0 = time.perf_counter()
        try:
            result[name] = run()
        except Exception:  # noqa: BLE001 - recorded; the next section still runs
            result["errors"][name] = traceback.format_exc()
        result.setdefault("seconds", {})[name] = time.perf_counter() - t0
        result["total_s"] = time.perf_counter() - t_start
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"[gpu_check] {name}: {'ERROR' if name in result['errors'] else 'done'} in {time.perf_counter() - t0:.1f}s", flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({k: result.get(k) for k in ("throughput", "dali")}, indent=1, default=str)[:4000])
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
