"""``dist-sam make-demo-data DIR``: a real small dataset in the ImageNet layout, no download.

The 1,797 handwritten digits bundled with scikit-learn (8x8, 10 classes) are upscaled and written
as JPEG files ``DIR/{train,val}/<digit>/digit_<i>.JPEG``. The split is fixed: every fifth image
(``i % 5 == 0``, 360 images) is validation, the other 1,437 train. Each channel is rendered with
ImageNet's mean and std, so the standard normalization gives inputs of mean ~0 and std ~1.

``--label-noise p`` moves a seeded fraction ``p`` of the *training* images to a different, random
class folder (the label-noise experiment of the paper's Table 4); validation stays clean and
``DIR/meta.json`` lists every flipped file. ``--synthetic N`` instead writes ``N`` generated
photo-like training JPEGs (and ``ceil(N / 10)`` validation ones) for throughput runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys

import numpy as np
from PIL import Image

from .config import IMAGENET_MEAN, IMAGENET_STD, VAL_CROP_FRACTION

__all__ = ["make_digits", "make_synthetic", "main"]

NUM_CLASSES = 10
VAL_EVERY = 5


def _prepare(root: str, force: bool) -> None:
    for split in ("train", "val"):
        path = os.path.join(root, split)
        if os.path.exists(path):
            if not force:
                raise FileExistsError(f"{path!r} already exists; pass --force to overwrite it")
            shutil.rmtree(path)


def _save(root: str, split: str, label: int, name: str, pixels: np.ndarray, quality: int) -> str:
    rel = os.path.join(split, str(label), name)
    os.makedirs(os.path.join(root, split, str(label)), exist_ok=True)
    Image.fromarray(pixels).save(os.path.join(root, rel), format="JPEG", quality=quality)
    return rel


def flip_labels(labels: np.ndarray, p: float, seed: int, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Move ``round(p * len(labels))`` seeded labels to a different class, uniformly at random."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {p!r}")
    rng = np.random.default_rng(seed)
    flip = rng.choice(len(labels), size=round(p * len(labels)), replace=False)
    noisy = labels.copy()
    noisy[flip] = (labels[flip] + rng.integers(1, num_classes, size=len(flip))) % num_classes
    return noisy


def make_digits(
    root: str, *, image_size: int = 64, label_noise: float = 0.0, seed: int = 0, force: bool = False
) -> dict:
    """Write the digits dataset (module docstring); return the metadata, also saved as ``meta.json``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)
    _prepare(root, force)
    up = np.stack(
        [np.asarray(Image.fromarray(x).resize((image_size, image_size), Image.BILINEAR)) for x in images]
    )
    # Statistics of what validation sees (the central 87.5%), so its normalized mean is ~0.
    edge = round(image_size * (1 - VAL_CROP_FRACTION) / 2)
    center = up[:, edge : image_size - edge, edge : image_size - edge]
    mu, sigma = float(center.mean()), float(center.std())
    is_val = np.arange(len(labels)) % VAL_EVERY == 0
    train_ids = np.flatnonzero(~is_val)
    noisy = labels.copy()
    noisy[train_ids] = flip_labels(labels[train_ids], label_noise, seed)
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    flipped = []
    for i, x in enumerate(up):
        rgb = 255.0 * (mean + std * ((x - mu) / sigma)[..., None])
        rel = _save(
            root,
            "val" if is_val[i] else "train",
            int(noisy[i]),
            f"digit_{i:04d}.JPEG",
            np.clip(rgb + 0.5, 0, 255).astype(np.uint8),
            95,
        )
        if noisy[i] != labels[i]:
            flipped.append({"file": rel, "true_label": int(labels[i]), "label": int(noisy[i])})
    meta = {
        "source": "sklearn.datasets.load_digits",
        "image_size": image_size,
        "num_train": int(len(train_ids)),
        "num_val": int(is_val.sum()),
        "label_noise": label_noise,
        "seed": seed,
        "flipped": flipped,
    }
    with open(os.path.join(root, "meta.json"), "w") as fh:
        json.dump(meta, fh, indent=1)
    return meta


def make_synthetic(
    root: str, num_images: int, *, image_size: int = 224, seed: int = 0, force: bool = False
) -> dict:
    """Write ``num_images`` photo-like training JPEGs and ``ceil(num_images / 10)`` validation ones."""
    if num_images < 1:
        raise ValueError(f"synthetic must be >= 1, got {num_images}")
    _prepare(root, force)
    rng = np.random.default_rng(seed)
    counts = {"train": num_images, "val": math.ceil(num_images / 10)}
    for split, n in counts.items():
        for i in range(n):
            # Smooth color fields plus sensor-like noise: JPEG sizes and decode cost close to photos.
            base = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(
                (image_size, image_size), Image.BICUBIC
            )
            pixels = np.asarray(base, dtype=np.float32) + rng.normal(0, 12, (image_size, image_size, 3))
            _save(
                root,
                split,
                i % NUM_CLASSES,
                f"synth_{i:06d}.JPEG",
                np.clip(pixels, 0, 255).astype(np.uint8),
                90,
            )
    meta = {
        "source": "synthetic",
        "image_size": image_size,
        "num_train": counts["train"],
        "num_val": counts["val"],
        "seed": seed,
    }
    with open(os.path.join(root, "meta.json"), "w") as fh:
        json.dump(meta, fh, indent=1)
    return meta


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-sam make-demo-data", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", help="output folder; gets train/ and val/ in the ImageNet layout")
    p.add_argument(
        "--label-noise",
        type=float,
        default=0.0,
        metavar="P",
        help="fraction of train labels to flip (default 0)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        metavar="N",
        help="side in pixels (default 64, or 224 with --synthetic)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed for label noise and synthetic images (default 0)"
    )
    p.add_argument(
        "--synthetic",
        type=int,
        default=None,
        metavar="N",
        help="write N generated photo-like JPEGs instead of digits",
    )
    p.add_argument("--force", action="store_true", help="overwrite existing train/ and val/ folders")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dist-sam make-demo-data``; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.image_size is not None and args.image_size < 8:
        _parser().error(f"--image-size must be >= 8, got {args.image_size}")
    try:
        if args.synthetic is not None:
            if args.label_noise:
                _parser().error("--label-noise applies to the digits dataset, not to --synthetic")
            meta = make_synthetic(
                args.dir, args.synthetic, image_size=args.image_size or 224, seed=args.seed, force=args.force
            )
        else:
            meta = make_digits(
                args.dir,
                image_size=args.image_size or 64,
                label_noise=args.label_noise,
                seed=args.seed,
                force=args.force,
            )
    except (ValueError, FileExistsError) as err:
        print(f"make-demo-data: {err}", file=sys.stderr)
        return 2
    extra = f", {len(meta['flipped'])} train labels flipped" if meta.get("flipped") else ""
    size, where = meta["image_size"], args.dir
    print(f"wrote {meta['num_train']} train + {meta['num_val']} val {size}px JPEGs to {where}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
