"""dist-sam with timm's model, data pipeline, optimizer factory, Mixup/CutMix and EMA (README "### timm").

One node, 8 GPUs (ImageNet layout: class folders under --data):
    torchrun --standalone --nproc_per_node=8 launch/examples/timm_recipe.py --model resnet50 --data /data/imagenet/train
CPU smoke run on synthetic images (the test runs this):
    python launch/examples/timm_recipe.py --model test_efficientnet --synthetic --image-size 32 --steps 2

timm builds the model (random init unless --pretrained), the augmentation (``resolve_data_config``
+ ``create_transform``), the AdamW with its no-decay groups (``create_optimizer_v2``), Mixup and
the EMA; dist-sam's ``SAM`` wraps timm's optimizer and ``sam_step`` does each step (local ascent:
one all-reduce per step). The loss is per sample, as ``sam_step`` needs: ``nn.CrossEntropyLoss
(reduction="none")`` takes Mixup's soft targets, and is exactly timm's ``SoftTargetCrossEntropy``
before its ``.mean()``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import timm
import timm.data
import timm.optim
import timm.utils
import torch
import torch.distributed as dist
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import dist_sam  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (downloads them)")
    p.add_argument("--data", help="an ImageFolder root")
    p.add_argument("--synthetic", action="store_true", help="random images instead of --data")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--image-size", type=int, help="override the model's input size")
    p.add_argument("--batch-size", type=int, default=128, help="per process")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--ema-decay", type=float, default=0.9998)
    args = p.parse_args(argv)

    distributed = "RANK" in os.environ  # torchrun
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)  # the same initial weights on every rank

    model = timm.create_model(args.model, pretrained=args.pretrained, num_classes=args.num_classes).to(device)
    data_cfg = timm.data.resolve_data_config(model=model)  # the model's input size, mean, std, crop
    if args.image_size:
        data_cfg["input_size"] = (3, args.image_size, args.image_size)
    transform = timm.data.create_transform(**data_cfg, is_training=True, auto_augment="rand-m9-mstd0.5-inc1")
    if args.synthetic:
        dataset = torchvision.datasets.FakeData(4 * args.batch_size, data_cfg["input_size"], args.num_classes, transform)
    else:
        dataset = torchvision.datasets.ImageFolder(args.data, transform)
    sampler = DistributedSampler(dataset) if distributed else None
    loader = DataLoader(dataset, args.batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True,
                        num_workers=0 if args.synthetic else 8)
    mixup = timm.data.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=args.num_classes)

    base = timm.optim.create_optimizer_v2(model, "adamw", lr=args.lr, weight_decay=0.05)
    opt = dist_sam.SAM(None, base, rho=args.rho)  # shares timm's param groups: timm's schedulers work too
    ema = timm.utils.ModelEmaV3(model, decay=args.ema_decay)
    net = DDP(model) if distributed else model
    loss_fn = nn.CrossEntropyLoss(reduction="none")  # per sample; soft (Mixup) targets welcome

    losses, step = [], 0
    for epoch in itertools.count():
        if sampler is not None:
            sampler.set_epoch(epoch)
        for x, y in loader:
            x, y = mixup(x.to(device), y.to(device))
            loss = dist_sam.sam_step(net, opt, loss_fn, x, y, ascent="local")
            step += 1
            ema.update(model, step=step)  # after the step: model holds the new w, never w + e (timm counts from 1)
            losses.append(loss.item())
            if rank == 0:
                print(f"step {step} loss {losses[-1]:.4f}", flush=True)
            if step == args.steps:
                if distributed:
                    dist.destroy_process_group()
                return {"losses": losses, "model": model, "ema": ema.module}


if __name__ == "__main__":
    main()
