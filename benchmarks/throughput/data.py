"""Input pipeline throughput: DALI (CPU) against the torchvision DataLoader, same transforms.

    python -m benchmarks.throughput.data                     # 320 synthetic 224px JPEGs, 2 workers
    python -m benchmarks.throughput.data --data data/imagenet --num-images 0

Both backends run ``dist_sam.data.build_loader`` with ``num_workers=2`` (DALI: 2 CPU threads), one
rank, batches to the CPU. Each backend gets a warm-up pass, then the passes alternate between
backends so a load spike hits both; the median pass gives images per second (DALI's include the
pipeline build and the <= 2 batches it prefetches past the epoch's end). The result goes to
``benchmarks/results/data_loader.json``. Target: DALI at least 1.5x torchvision on the train split.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch
import torchvision

from dist_sam.data import DataConfig, build_loader
from dist_sam.data.demo import make_synthetic

from ..common import output

TARGET_RATIO = 1.5
BACKENDS = ("dali", "torchvision")


def _timed_pass(loader) -> tuple[int, float]:
    start, images = time.perf_counter(), 0
    for x, _, _ in loader:
        images += x.shape[0]
    return images, time.perf_counter() - start


def run(
    data: str, *, image_size: int, batch_size: int, workers: int, passes: int, splits: tuple[str, ...]
) -> dict:
    loaders = {
        b: build_loader(
            DataConfig(
                root=data,
                backend=b,
                image_size=image_size,
                batch_size=batch_size,
                num_workers=workers,
                dali_cpu_threads=workers,
                device="cpu",
            ),
            0,
            1,
        )
        for b in BACKENDS
    }
    result = {}
    for split in splits:
        rates = {b: [] for b in BACKENDS}
        for b in BACKENDS:
            _timed_pass(getattr(loaders[b], split))  # warm-up: page cache, worker start, DALI build
        for epoch in range(passes):
            for b in BACKENDS:
                loader = getattr(loaders[b], split)
                loader.set_epoch(epoch + 1)
                images, seconds = _timed_pass(loader)
                rates[b].append(images / seconds)
        med = {b: statistics.median(r) for b, r in rates.items()}
        result[split] = {
            "images_per_pass": getattr(loaders["dali"], split).plan().per_rank,
            "img_per_s": {b: round(v, 1) for b, v in med.items()},
            "img_per_s_all_passes": {b: [round(v, 1) for v in r] for b, r in rates.items()},
            "ratio_dali_over_torchvision": round(med["dali"] / med["torchvision"], 2),
        }
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="ImageNet-layout folder (default: generate synthetic JPEGs)")
    p.add_argument("--num-images", type=int, default=320, help="synthetic training images to generate")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--out", default=os.path.join(output.RESULTS_DIR, "data_loader.json"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or tmp
        if args.data is None:
            make_synthetic(tmp, args.num_images, image_size=args.image_size, seed=0)
            # Time validation over as many images as training: one batch would measure only start-up.
            shutil.rmtree(os.path.join(tmp, "val"))
            os.symlink(os.path.join(tmp, "train"), os.path.join(tmp, "val"))
        load_before = os.getloadavg()[0]
        result = run(
            data,
            image_size=args.image_size,
            batch_size=args.batch_size,
            workers=args.workers,
            passes=args.passes,
            splits=("train", "val"),
        )
    from nvidia import dali

    report = {
        "benchmark": "input pipeline, DALI CPU vs torchvision DataLoader (same transforms)",
        "data": args.data
        or f"synthetic: the same {args.num_images} {args.image_size}px JPEGs as train and as val",
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "workers_or_dali_threads": args.workers,
        "passes": args.passes,
        **result,
        "target_ratio": TARGET_RATIO,
        "meets_target": result["train"]["ratio_dali_over_torchvision"] >= TARGET_RATIO,
        "machine": output.machine(torch_threads=torch.get_num_threads(), loadavg_1min_before=round(load_before, 2),
                                  loadavg_1min_after=round(os.getloadavg()[0], 2), torchvision=torchvision.__version__,
                                  dali=dali.__version__, cuda_available=torch.cuda.is_available()),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    output.write_json(report, args.out, indent=2)
    for split in ("train", "val"):
        rate, ratio = report[split]["img_per_s"], report[split]["ratio_dali_over_torchvision"]
        print(f"{split}: dali {rate['dali']} img/s, torchvision {rate['torchvision']} img/s, ratio {ratio}x")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
