"""The sections of ``benchmarks.gpu.check``: each ``fn(opts, device, workdir) -> dict`` (plain data).

``opts`` is ``check.FULL`` on the GPU and ``check.DRY`` under ``--dry-run`` (the same code, tiny,
on the CPU). Adding a section is one function here and one entry in ``check.SECTIONS``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import time
from typing import Any

import torch

__all__ = ["VARIANTS", "COMPILED_VARIANTS", "check_correctness", "time_variants", "time_compiled", "time_compiled_rwsam",
           "fp16_scaler", "ddp_trainer", "dali_throughput", "synthetic_jpegs"]

VARIANTS = ("sgd", "sam-local", "rwsam-fd", "rwsam-last_layer", "msam-b/4", "msam-b/4-vmap")
COMPILED_VARIANTS = ("sgd", "sam-local", "msam-b/4")  # msam-b/4-vmap runs the eager module (torch.func)
COMPILED_RWSAM = ("sgd", "rwsam-fd", "rwsam-last_layer")
RATIOS = (("sam-local", "sgd"), ("rwsam-fd", "sam-local"), ("rwsam-last_layer", "sam-local"), ("msam-b/4", "sgd"),
          ("msam-b/4-vmap", "msam-b/4"))


def bench_config(opts: dict, device: str, variants=VARIANTS, **extra: Any):
    from ..throughput.config import BenchConfig

    return BenchConfig(name="gpu_check", model=opts["model"], image_size=opts["image_size"], num_classes=opts["num_classes"],
                       batch_size=opts["batch_size"], world_sizes=(1,), threads=max(1, torch.get_num_threads()), variants=variants,
                       warmup=opts["warmup"], steps=opts["steps"], steps_per_round=max(1, opts["steps"] // 4), device=device,
                       autocast_dtype="bfloat16", channels_last=True, quick=opts["steps"] < 20, **extra)


def _batch(cfg, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=gen).to(device, memory_format=torch.channels_last)
    return x, torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=gen).to(device)


def _fresh_model(cfg, device: str):
    from dist_sam.train.models import build_model

    torch.manual_seed(0)
    return build_model(cfg.model, num_classes=cfg.num_classes, channels_last=True).to(device)


def check_correctness(opts: dict, device: str, workdir: str) -> dict[str, Any]:
    """3 steps at lr 0.1 per variant on a fresh model: finite loss, finite and moved weights."""
    from ..throughput.harness import available_variants, make_step, parse_variant

    cfg = bench_config(opts, device, lr=0.1)
    names, skipped = available_variants(VARIANTS)
    x, y = _batch(cfg, device)
    out: dict[str, Any] = {"skipped": skipped}
    for name in names:
        model = _fresh_model(cfg, device)
        before = [p.detach().clone() for p in model.parameters()]
        step, _ = make_step(parse_variant(name, cfg.batch_size, 1, cfg), model, cfg)
        losses = [float(step(x, y)) for _ in range(3)]
        finite_w = all(bool(torch.isfinite(p).all()) for p in model.parameters())
        moved = any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
        out[name] = dict(losses=losses, finite_loss=all(v == v and abs(v) != float("inf") for v in losses),
                         finite_weights=finite_w, weights_moved=moved)
        out[name]["ok"] = out[name]["finite_loss"] and finite_w and moved
        del model, before
    out["ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict) and "ok" in v)
    return out


def time_variants(opts: dict, device: str, workdir: str = "", variants=VARIANTS, **extra: Any) -> dict[str, Any]:
    """Interleaved timing on one model (``benchmarks.throughput.harness.measure``, no DDP): img/s, peak memory."""
    from ..throughput.harness import measure

    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    cfg = bench_config(opts, device, variants=variants, **extra)
    start = time.perf_counter()
    raw = measure(cfg, ddp=False)
    rows = {}
    for name, v in raw["variants"].items():
        median = statistics.median(v["times"])
        rows[name] = dict(step_time_ms=1e3 * median, img_per_s=cfg.batch_size / median, n=len(v["times"]), finite=v["finite"],
                          peak_memory_mb=None if v["peak_memory_bytes"] is None else v["peak_memory_bytes"] / 2**20)
    ratios = {f"{a}/{b}": rows[a]["step_time_ms"] / rows[b]["step_time_ms"] for a, b in RATIOS if a in rows and b in rows}
    return dict(config=dataclasses.asdict(cfg), variants=rows, ratios=ratios, skipped=raw["skipped"],
                memory_method=raw["memory_method"], wall_s=time.perf_counter() - start)


def time_compiled(opts: dict, device: str, workdir: str) -> dict[str, Any]:
    """As :func:`time_variants` through ``torch.compile`` (its warm-up compiles; ``wall_s`` counts it)."""
    return time_variants(opts, device, workdir, COMPILED_VARIANTS, compile=True, compile_backend=opts["compile_backend"])


def time_compiled_rwsam(opts: dict, device: str, workdir: str) -> dict[str, Any]:
    """RW-SAM ``fd`` (its extra forward compiled) and ``last_layer`` through ``torch.compile``."""
    return time_variants(opts, device, workdir, COMPILED_RWSAM, compile=True, compile_backend=opts["compile_backend"])


def fp16_scaler(opts: dict, device: str, workdir: str) -> dict[str, Any]:
    """SAM-local under fp16 autocast with a ``GradScaler``: finite steps that move the weights, then
    a batch with an inf skips the step (weights untouched) and halves the scale; img/s."""
    import dist_sam

    cfg = bench_config(opts, device)
    model = _fresh_model(cfg, device)
    opt = dist_sam.create_optimizer("sam", model.parameters(), lr=0.1, momentum=0.9, rho=0.05)
    scaler = torch.amp.GradScaler(device)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    x, y = _batch(cfg, device)
    step = lambda xb: dist_sam.sam_step(model, opt, loss_fn, xb, y, scaler=scaler, autocast_dtype=torch.float16)  # noqa: E731
    before = [p.detach().clone() for p in model.parameters()]
    losses = [float(step(x)) for _ in range(3)]
    moved = any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    held, scale = [p.detach().clone() for p in model.parameters()], scaler.get_scale()
    bad = x.clone()
    bad[0] = float("inf")
    with _quiet():
        step(bad)
    skipped = all(torch.equal(p, q) for p, q in zip(model.parameters(), held))
    times = []
    for _ in range(opts["steps"]):
        _sync(device)
        t0 = time.perf_counter()
        step(x)
        _sync(device)
        times.append(time.perf_counter() - t0)
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    ok = moved and skipped and finite and scaler.get_scale() < scale and all(v == v for v in losses)
    return dict(ok=ok, losses=losses, weights_moved=moved, inf_step_skipped=skipped, scale_before_inf=scale,
                scale_after_inf=scaler.get_scale(), finite_weights=finite, img_per_s=cfg.batch_size / statistics.median(times))


@contextlib.contextmanager
def _quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def synthetic_jpegs(opts: dict, workdir: str) -> str:
    """``dist-sam make-demo-data --synthetic`` JPEGs in ``workdir`` (written once per run)."""
    from dist_sam.data.demo import make_synthetic

    root = os.path.join(workdir, "synthetic_jpegs")
    if not os.path.isdir(os.path.join(root, "train")):
        make_synthetic(root, opts["dali_images"], image_size=opts["dali_image_size"], seed=0, force=True)
    return root


def ddp_trainer(opts: dict, device: str, workdir: str) -> dict[str, Any]:
    """The trainer, DDP at world size 1 (NCCL on the GPU, gloo in the dry run), 2 short epochs of
    SAM-local on the synthetic JPEGs through DALI (``mixed`` decode on the GPU)."""
    import torch.distributed as dist
    import yaml

    from dist_sam.data import dali
    from dist_sam.distributed import init_distributed

    root = synthetic_jpegs(opts, workdir)
    out = os.path.join(workdir, "trainer_run")
    backend = "dali" if dali.dali_available() else "torchvision"
    tree = {"run": {"output_dir": out, "epochs": 2, "progress": False, "tensorboard": False,
                    "precision": "bf16" if device == "cuda" else "fp32", "log_every": 1000},
            "model": {"name": opts["model"]}, "optim": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-5},
            "schedule": {"warmup_epochs": 0.5}, "sam": {"variant": "sam", "ascent": "local", "rho": 0.05},
            "data": {"root": root, "backend": backend, "device": device, "image_size": opts["image_size"],
                     "batch_size": opts["trainer_batch"], "num_workers": opts["dali_threads"], "channels_last": True,
                     "validate_files": False, "drop_last": True},
            "checkpoint": {"keep_last": 1}}
    path = os.path.join(workdir, "trainer.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(tree, fh)
    from dist_sam.train.config import load_config

    cfg = load_config(path)
    saved_env = dict(os.environ)  # init_distributed exports RANK, MASTER_PORT...: put them back after
    start = time.perf_counter()
    try:
        env = init_distributed("env", backend="nccl" if device == "cuda" else "gloo", always=True)
        trainer = _single_process_ddp_trainer()(cfg, env)
        summary = trainer.run()
        trainer.write_outputs(summary)
        wrapped = type(trainer.model).__name__
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved_env)
    keys = ("finished", "epochs_completed", "global_step", "top1", "images_per_second", "comm_per_step", "step_time_ms")
    result = {k: summary.get(k) for k in keys}
    ok = bool(summary.get("finished")) and summary.get("epochs_completed") == 2 and wrapped == "DistributedDataParallel"
    return dict(ok=ok, wrapped=wrapped, process_group=backend_name(device), data_backend=backend,
                decode="mixed (nvJPEG)" if device == "cuda" and backend == "dali" else "cpu", wall_s=time.perf_counter() - start, **result)


def backend_name(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


def _single_process_ddp_trainer():
    """``Trainer`` that wraps DDP even with one process (it does not otherwise)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dist_sam.distributed import CommCounter
    from dist_sam.train.loop import Trainer

    class SingleProcessDDPTrainer(Trainer):
        def setup(self, model):
            super().setup(model)
            if not isinstance(self.model, DDP):
                ids = [self.device.index or 0] if self.device.type == "cuda" else None
                self.model = DDP(self.model, device_ids=ids)
                self.comm = CommCounter.attach(self.model)

    return SingleProcessDDPTrainer


def dali_throughput(opts: dict, device: str, workdir: str) -> dict[str, Any]:
    """Decode the synthetic JPEGs through ``dist_sam.data``'s DALI loader; img/s after a warm-up epoch."""
    from dist_sam.data import DataConfig, build_loader

    t0 = time.perf_counter()
    root = synthetic_jpegs(opts, workdir)
    generate_s = time.perf_counter() - t0
    cfg = DataConfig(root=root, backend="dali", image_size=opts["image_size"], batch_size=opts["dali_batch"],
                     num_workers=opts["dali_threads"], channels_last=True, device=device, drop_last=True, validate_files=False)
    train = build_loader(cfg, 0, 1).train
    epochs = []
    for epoch in range(opts["dali_epochs"]):
        train.set_epoch(epoch)
        start, n = time.perf_counter(), 0
        for batch in train:
            n += batch[0].shape[0]
            last = batch[0]
        _sync(device)
        epochs.append(dict(images=n, seconds=time.perf_counter() - start))
    timed = epochs[1:] or epochs
    return dict(decode="mixed (nvJPEG)" if device == "cuda" else "cpu", images=opts["dali_images"], source_side_px=opts["dali_image_size"],
                output=list(last.shape), output_dtype=str(last.dtype), threads=opts["dali_threads"], generate_s=generate_s, epochs=epochs,
                img_per_s=sum(e["images"] for e in timed) / sum(e["seconds"] for e in timed))
