"""The sweep's measurement side: the timing loop and the processes that run it.

``make_step`` (one variant's step on a model); ``measure`` (every variant in this process,
interleaved rounds, with all-reduce counts and peak memory via :class:`PeakMemory`);
``run_world`` (``measure`` on ``n`` spawned processes). The config and variant names live in
``benchmarks.throughput.config`` and are re-exported here; the summaries, checks and output files
are ``benchmarks.throughput.report``; the entry point is ``benchmarks.throughput.run``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import torch
from torch import nn

import dist_sam
from dist_sam.distributed.ddp import CommCounter
from dist_sam.train.models import build_model

from ..common.procs import spawn
from ..common.timing import PeakMemory, rotated
from .config import DEFAULT_VARIANTS, RESULTS_DIR, BenchConfig, Variant, load_config, parse_variant

__all__ = ["DEFAULT_VARIANTS", "RESULTS_DIR", "BenchConfig", "Variant", "parse_variant", "load_config", "PeakMemory",
           "make_step", "compile_model", "available_variants", "measure", "run_world"]


# -- one process: build, warm up, time ----------------------------------------------------------
def make_step(variant: Variant, model: nn.Module, cfg: BenchConfig) -> tuple[Callable, torch.optim.Optimizer]:
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    base = dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    dtype = getattr(torch, cfg.autocast_dtype) if cfg.autocast_dtype else None
    if variant.optimizer is None:
        opt = torch.optim.SGD(model.parameters(), **base)
        alpha, g_v = dict(variant.options).get("reuse_alpha"), []

        def sgd_step(x, y):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
                loss = loss_fn(model(x), y).mean()
            loss.backward()
            if alpha is not None:
                reuse_floor_([p.grad for p in model.parameters() if p.grad is not None], g_v, alpha)
            opt.step()
            return loss.detach()

        return sgd_step, opt
    opt = dist_sam.create_optimizer(variant.optimizer, model.parameters(), base="sgd", **base, **dict(variant.options))

    def sam_step(x, y):
        return dist_sam.sam_step(model, opt, loss_fn, x, y, ascent=variant.ascent, micro_impl=variant.micro_impl,
                                 micro_batch_size=variant.micro_batch_size, autocast_dtype=dtype)

    return sam_step, opt


@torch.no_grad()
def reuse_floor_(grads: list[torch.Tensor], g_v: list[torch.Tensor], alpha: float) -> None:
    """What a LookSAM off step must add to SGD, and nothing else: ``||g||`` (one read of the
    gradients) and ``g += alpha (||g|| / ||g_v||) g_v`` (one fused axpy). ``g_v`` is a fixed
    direction of the gradients' shapes, drawn on the first call (its norm once, as LookSAM stores it)."""
    if not g_v:
        g_v.extend(torch.randn_like(g) for g in grads)
        g_v.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g_v))))
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_add_(grads, g_v[:-1], alpha=float(alpha * norm / g_v[-1]))


def compile_model(module: nn.Module, cfg: BenchConfig) -> nn.Module:
    """``torch.compile(module, mode=cfg.compile_mode, backend=cfg.compile_backend)`` when
    ``cfg.compile``, static shapes, with room in dynamo's cache for every m; else ``module``."""
    return _compile(module, cfg) if cfg.compile else module


def _compile(module: nn.Module, cfg: BenchConfig) -> nn.Module:
    import torch._dynamo

    for key in ("recompile_limit", "cache_size_limit"):  # one graph set per micro-batch size
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, max(64, getattr(torch._dynamo.config, key)))
    return torch.compile(module, mode=cfg.compile_mode, backend=cfg.compile_backend, dynamic=False)


def _build_model(cfg: BenchConfig) -> nn.Module:
    """``dist_sam.train.models.build_model``, plus ``resnet18_cifar``: the paper's CIFAR ResNet-18
    (3x3 stride-1 stem, no max-pool), 15x the compute of torchvision's stem at 32px."""
    if cfg.model != "resnet18_cifar":
        return build_model(cfg.model, num_classes=cfg.num_classes, channels_last=cfg.channels_last)
    model = build_model("resnet18", num_classes=cfg.num_classes)
    model.conv1, model.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def available_variants(names: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """The names whose optimizer is registered, and a reason for each one skipped."""
    registered = set(dist_sam.list_optimizers())
    skipped = {n: f"{n.split('-')[0]} is not registered in this dist_sam (create_optimizer({n.split('-')[0]!r}) unknown)"
               for n in names if n.split("-")[0] in ("rwsam", "looksam") and n.split("-")[0] not in registered}
    return [n for n in names if n not in skipped], skipped


def _setup(cfg: BenchConfig, rank: int, ddp: bool) -> tuple[nn.Module, nn.Module, CommCounter | None, list]:
    """The model (seeded), its DDP wrapper and comm counter when ``ddp``, and two fixed synthetic batches."""
    device = cfg.torch_device
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    module, model, counter = _model(cfg, ddp, compiled=cfg.compile)
    gen = torch.Generator().manual_seed(1000 + rank)
    batches = [(torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=gen).to(device, memory_format=fmt),
                torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=gen).to(device)) for _ in range(2)]
    return module, model, counter, batches


def _model(cfg: BenchConfig, ddp: bool, *, compiled: bool) -> tuple[nn.Module, nn.Module, CommCounter | None]:
    """The module (seeded: every call builds the same weights), what steps run (compiled, DDP), its counter."""
    device = cfg.torch_device
    torch.manual_seed(0)
    module = _build_model(cfg).to(device)
    model: nn.Module = _compile(module, cfg) if compiled else module
    counter = None
    if ddp:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        counter = CommCounter.attach(model)
    return module, model, counter


def _prime(model: nn.Module, batches: list, cfg: BenchConfig) -> None:
    """Two plain synchronized passes: DDP (re)builds its buckets, cuDNN picks kernels."""
    device = cfg.torch_device
    dtype = getattr(torch, cfg.autocast_dtype) if cfg.autocast_dtype else None
    for i in range(2):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(model(batches[i][0]), batches[i][1])
        loss.backward()
    model.zero_grad(set_to_none=True)


def _one_step(step: Callable, batch: tuple, counter: CommCounter | None, sync: Callable[[], Any],
              record: dict | None) -> None:
    """Run one step; into ``record`` (when given) its time, all-reduce calls/bytes and loss finiteness."""
    x, y = batch
    if counter is not None:
        counter.reset()
    sync()
    start = time.perf_counter()
    loss = step(x, y)
    sync()
    elapsed = time.perf_counter() - start
    if record is not None:
        record["times"].append(elapsed)
        record["calls"].append(counter.calls if counter else None)
        record["bytes"].append(counter.bytes if counter else None)
        record["finite"] &= bool(torch.isfinite(loss))


def measure(cfg: BenchConfig, *, rank: int = 0, world_size: int = 1, ddp: bool = True) -> dict[str, Any]:
    """Time every available variant in this process; returns plain Python data.

    With ``ddp`` the process group must be initialized; the model is wrapped in DDP and a
    ``CommCounter`` counts the gradient all-reduces of every step.
    """
    device = cfg.torch_device
    module, model, counter, batches = _setup(cfg, rank, ddp)
    names, skipped = available_variants(cfg.variants)
    variants = {n: parse_variant(n, cfg.batch_size, world_size, cfg) for n in names}
    # ``+compiled`` variants step a compiled twin (same weights) in the same interleaved rounds
    twin = _model(cfg, ddp, compiled=True) if any(v.compiled for v in variants.values()) else None
    models = {n: twin if v.compiled else (module, model, counter) for n, v in variants.items()}
    steps = {n: make_step(v, models[n][1], cfg) for n, v in variants.items()}
    compiled = [n for n in names if cfg.compile or variants[n].compiled]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    probe = PeakMemory(device)
    out = {n: dict(times=[], calls=[], bytes=[], peak_memory_bytes=None, finite=True) for n in names}

    def run(n: str, i: int, timed: bool) -> None:
        _one_step(steps[n][0], batches[i % 2], models[n][2], sync, out[n] if timed else None)

    _prime(model, batches, cfg)
    if twin is not None:
        _prime(twin[1], batches, cfg)
    # Compiled: RW-SAM last_layer first, since registering its hook drops dynamo's graphs once
    # (dist_sam.compiled); then a second warm-up pass, so no timed step compiles.
    order = sorted(names, key=lambda n: "last_layer" not in n) if compiled else names
    for n in order:  # warm-up; the first step of each variant also allocates its optimizer state
        out[n]["peak_memory_bytes"] = probe.measure(lambda: run(n, 0, False))
        for i in range(1, cfg.warmup):
            run(n, i, False)
    for n in (n for n in order if n in compiled):
        run(n, 1, False)
    rounds = math.ceil(cfg.steps / cfg.steps_per_round)
    for r in range(rounds):
        for n in rotated(names, r):
            for i in range(cfg.steps_per_round):
                run(n, i, True)
    out = {n: dict(v, finite=v["finite"] and all(bool(torch.isfinite(p).all()) for p in models[n][0].parameters()))
           for n, v in out.items()}
    return dict(variants=out, skipped=skipped, memory_method=probe.method,
                param_bytes=sum(p.numel() * p.element_size() for p in module.parameters()))


# -- processes ----------------------------------------------------------------------------------
def _rank_measure(rank: int, world_size: int, cfg_dict: dict) -> dict:
    # on a GPU, spawn made cuda:rank the current device, which "cuda" then means
    return measure(BenchConfig(**cfg_dict), rank=rank, world_size=world_size)


def run_world(cfg: BenchConfig, world_size: int) -> list[dict]:
    """Run :func:`measure` on ``world_size`` spawned processes; one result per rank."""
    return spawn(_rank_measure, world_size, dataclasses.asdict(cfg), timeout_s=cfg.timeout_s, threads=cfg.threads,
                 device=str(cfg.torch_device))
