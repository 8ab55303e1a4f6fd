"""The sweep: step time, throughput, all-reduce calls/bytes and peak memory of every SAM variant.

    dist-sam bench --config benchmarks/configs/cpu.yaml        # or: python -m benchmarks.run ...
    python -m benchmarks.run --config benchmarks/configs/quick.yaml --out /tmp/bench

For each world size in the config, ``n`` processes (gloo on CPU, NCCL on GPU) hold one DDP model
(``n = 1`` included: the same code path as ``torchrun --nproc_per_node=1``, so communication is
counted, not assumed) and one optimizer per variant on its parameters. Variants are interleaved:
each round runs ``steps_per_round`` steps of every variant in turn (the order rotates per round),
so a slow spell of a shared machine hits all of them alike; a variant's step time is the median
over its timed steps of the slowest rank. Ratios are against SGD measured in the same run.

``lr`` defaults to 0: the weights stay at their initialization so every variant is timed at the
same point (the base optimizer's arithmetic still runs). Inputs are synthetic, in memory: this
times the step, not the input pipeline. Outputs: ``<out>/<name>.json``, ``<name>.md`` and PNG
plots (``benchmarks.plots``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import socket
import statistics
import sys
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

import dist_sam
from dist_sam.distributed.ddp import CommCounter
from dist_sam.train.models import build_model

__all__ = ["BenchConfig", "Variant", "parse_variant", "load_config", "make_step", "available_variants", "PeakMemory",
           "measure", "run_world", "summarize", "scaling", "checks", "machine", "run_sweep", "main"]

SCHEMA = "dist-sam-bench/1"
DEFAULT_VARIANTS = ("sgd", "sam-local", "sam-global", "usam", "asam", "msam-b", "msam-b/2", "msam-b/4",
                    "msam-b/8", "rwsam-fd", "rwsam-last_layer")
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclasses.dataclass(kw_only=True)
class BenchConfig:
    """One sweep. YAML keys are these field names (``benchmarks/configs/*.yaml``).

    Attributes:
        name: output file stem, ``<out>/<name>.json``.
        model: ``small_cnn``, ``resnet18``, ``resnet50`` (``dist_sam.train.models``) or ``resnet18_cifar``.
        image_size, num_classes: synthetic input side and classes.
        batch_size: per worker (``b``); m-SAM variants ``msam-b/k`` use ``m = b / k``.
        world_sizes: process counts to run, each a separate set of processes.
        threads: torch intra-op threads per process (recorded in the results).
        variants: names accepted by :func:`parse_variant`.
        warmup: untimed steps per variant (the first one measures peak memory).
        steps: timed steps per variant (at least 20 unless ``quick``).
        steps_per_round: consecutive steps of one variant before the next variant's turn.
        rho, asam_rho, lam, mu: SAM radius, ASAM radius, RW-SAM temperature and FD step.
        lr, momentum, weight_decay: the base SGD (``lr=0`` keeps the weights fixed).
        device: ``cpu``, ``cuda`` or ``auto``.
        autocast_dtype: ``null`` or ``bfloat16``/``float16``.
        channels_last: model and inputs in ``torch.channels_last``.
        quick: a smoke run (allows fewer than 20 timed steps, marked in the results).
        timeout_s: per world size, for the spawned processes.
    """

    name: str = "bench"
    model: str = "resnet18"
    image_size: int = 32
    num_classes: int = 10
    batch_size: int = 32
    world_sizes: tuple[int, ...] = (1, 2)
    threads: int = 1
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    warmup: int = 2
    steps: int = 20
    steps_per_round: int = 2
    rho: float = 0.05
    asam_rho: float = 0.5
    lam: float = 0.5
    mu: float = 1e-4
    lr: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    device: str = "cpu"
    autocast_dtype: str | None = None
    channels_last: bool = False
    quick: bool = False
    timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        self.world_sizes, self.variants = tuple(self.world_sizes), tuple(self.variants)
        for key in ("image_size", "num_classes", "batch_size", "threads", "warmup", "steps", "steps_per_round"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BenchConfig.{key} must be an integer >= 1, got {value!r}")
        if not self.world_sizes or any(not isinstance(n, int) or n < 1 for n in self.world_sizes):
            raise ValueError(f"BenchConfig.world_sizes must be integers >= 1, got {self.world_sizes!r}")
        if self.steps < 20 and not self.quick:
            raise ValueError(f"BenchConfig.steps must be >= 20 (median of at least 20 steps), got {self.steps}; "
                             "set quick: true for a smoke run")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"BenchConfig.device must be 'cpu', 'cuda' or 'auto', got {self.device!r}")
        if self.autocast_dtype not in (None, "bfloat16", "float16"):
            raise ValueError(f"BenchConfig.autocast_dtype must be null, 'bfloat16' or 'float16', got {self.autocast_dtype!r}")
        if "sgd" not in self.variants:
            raise ValueError("BenchConfig.variants must include 'sgd': every ratio is against it")
        for name in self.variants:
            parse_variant(name, self.batch_size, 1, self)  # raises ValueError on a bad name or m

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclasses.dataclass(frozen=True)
class Variant:
    """How one variant steps: ``optimizer=None`` is plain SGD; ``m`` is the paper's m for it."""

    name: str
    optimizer: str | None
    ascent: str = "local"
    micro_batch_size: int | None = None
    m: int | None = None
    options: tuple[tuple[str, Any], ...] = ()


def parse_variant(name: str, b: int, world_size: int, cfg: BenchConfig) -> Variant:
    """``sgd``, ``sam-local``, ``sam-global``, ``usam``, ``asam``, ``msam-b[/k]``, ``rwsam-<estimator>``."""
    sam = (("rho", cfg.rho),)
    if name == "sgd":
        return Variant(name, None)
    if name in ("sam-local", "sam-global"):
        ascent = name.split("-")[1]
        return Variant(name, "sam", ascent, m=b if ascent == "local" else world_size * b, options=sam)
    if name == "usam":
        return Variant(name, "usam", m=b, options=sam)
    if name == "asam":
        return Variant(name, "asam", m=b, options=(("rho", cfg.asam_rho),))
    if name.startswith("msam-b"):
        k = name[len("msam-b"):]
        k = int(k[1:]) if k.startswith("/") and k[1:].isdigit() else (1 if k == "" else 0)
        if k < 1 or b % k:
            raise ValueError(f"variant {name!r}: expected msam-b or msam-b/k with k dividing batch_size {b}")
        return Variant(name, "sam", "micro", micro_batch_size=b // k, m=b // k, options=sam)
    if name.startswith("rwsam-"):
        estimator = name[len("rwsam-"):]
        if estimator not in ("fd", "last_layer", "exact"):
            raise ValueError(f"variant {name!r}: the RW-SAM estimator must be fd, last_layer or exact")
        opts = sam + (("estimator", estimator), ("lam", cfg.lam)) + ((("mu", cfg.mu),) if estimator == "fd" else ())
        return Variant(name, "rwsam", m=b, options=opts)
    raise ValueError(f"unknown variant {name!r}; accepted: {DEFAULT_VARIANTS} (msam-b/k for any k dividing b), rwsam-exact")


def load_config(path: str | None, **overrides: Any) -> BenchConfig:
    """``BenchConfig`` from a YAML file (or the defaults), with non-``None`` overrides applied."""
    import yaml

    values: dict[str, Any] = {}
    if path:
        with open(path) as fh:
            values = yaml.safe_load(fh) or {}
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(BenchConfig)})
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; accepted: {[f.name for f in dataclasses.fields(BenchConfig)]}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return BenchConfig(**values)


class PeakMemory:
    """Peak extra memory of one call, and how it was measured (:attr:`method`).

    CUDA: ``max_memory_allocated`` minus ``memory_allocated`` before the call. Linux CPU: the
    kernel's peak-RSS mark (``VmHWM``) minus ``VmRSS`` before the call, after ``malloc_trim(0)``
    returned freed heap to the OS and the mark was reset (``/proc/self/clear_refs`` = 5); this
    counts every page the call touches (tensors, allocator overhead), not only tensor bytes.
    Elsewhere: ``None``.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._trim = None
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated() - memory_allocated() before the step"
        elif self._linux_probe():
            self.method = "VmHWM - VmRSS before the step (Linux; malloc_trim(0) and clear_refs=5 first)"
        else:
            self.method = None

    def _linux_probe(self) -> bool:
        try:
            import ctypes

            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            return self._status("VmHWM") is not None
        except (OSError, AttributeError):
            return False

    @staticmethod
    def _status(key: str) -> int | None:
        with open("/proc/self/status") as fh:
            return next((int(line.split()[1]) * 1024 for line in fh if line.startswith(key + ":")), None)

    def measure(self, fn: Callable[[], Any]) -> int | None:
        """Run ``fn()``; return its peak extra memory in bytes (``None`` without a method)."""
        if self.method is None:
            fn()
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - before
        import gc

        gc.collect()
        self._trim(0)
        before = self._status("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        fn()
        return max(0, self._status("VmHWM") - before)


# -- one process: build, warm up, time ----------------------------------------------------------
def make_step(variant: Variant, model: nn.Module, cfg: BenchConfig) -> tuple[Callable, torch.optim.Optimizer]:
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    base = dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    dtype = getattr(torch, cfg.autocast_dtype) if cfg.autocast_dtype else None
    if variant.optimizer is None:
        opt = torch.optim.SGD(model.parameters(), **base)

        def sgd_step(x, y):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
                loss = loss_fn(model(x), y).mean()
            loss.backward()
            opt.step()
            return loss.detach()

        return sgd_step, opt
    opt = dist_sam.create_optimizer(variant.optimizer, model.parameters(), base="sgd", **base, **dict(variant.options))

    def sam_step(x, y):
        return dist_sam.sam_step(model, opt, loss_fn, x, y, ascent=variant.ascent,
                                 micro_batch_size=variant.micro_batch_size, autocast_dtype=dtype)

    return sam_step, opt


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
    skipped = {n: "RW-SAM is not registered in this dist_sam (create_optimizer('rwsam') unknown)"
               for n in names if n.startswith("rwsam-") and "rwsam" not in registered}
    return [n for n in names if n not in skipped], skipped


def measure(cfg: BenchConfig, *, rank: int = 0, world_size: int = 1, ddp: bool = True) -> dict[str, Any]:
    """Time every available variant in this process; returns plain Python data.

    With ``ddp`` the process group must be initialized; the model is wrapped in DDP and a
    ``CommCounter`` counts the gradient all-reduces of every step.
    """
    device = cfg.torch_device
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    module = _build_model(cfg).to(device)
    model: nn.Module = module
    counter = None
    if ddp:
        model = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
        counter = CommCounter.attach(model)
    gen = torch.Generator().manual_seed(1000 + rank)
    batches = [(torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=gen).to(device, memory_format=fmt),
                torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=gen).to(device)) for _ in range(2)]
    names, skipped = available_variants(cfg.variants)
    steps = {n: make_step(parse_variant(n, cfg.batch_size, world_size, cfg), model, cfg) for n in names}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    probe = PeakMemory(device)
    out = {n: dict(times=[], calls=[], bytes=[], peak_memory_bytes=None, finite=True) for n in names}

    def run(n: str, i: int, timed: bool) -> None:
        x, y = batches[i % 2]
        if counter is not None:
            counter.reset()
        sync()
        start = time.perf_counter()
        loss = steps[n][0](x, y)
        sync()
        elapsed = time.perf_counter() - start
        if timed:
            out[n]["times"].append(elapsed)
            out[n]["calls"].append(counter.calls if counter else None)
            out[n]["bytes"].append(counter.bytes if counter else None)
            out[n]["finite"] &= bool(torch.isfinite(loss))

    dtype = getattr(torch, cfg.autocast_dtype) if cfg.autocast_dtype else None
    for i in range(2):  # two plain synchronized passes: DDP (re)builds its buckets, cuDNN picks kernels
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(model(batches[i][0]), batches[i][1])
        loss.backward()
    model.zero_grad(set_to_none=True)
    for n in names:  # warm-up; the first step of each variant also allocates its optimizer state
        out[n]["peak_memory_bytes"] = probe.measure(lambda: run(n, 0, False))
        for i in range(1, cfg.warmup):
            run(n, i, False)
    rounds = math.ceil(cfg.steps / cfg.steps_per_round)
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            for i in range(cfg.steps_per_round):
                run(n, i, True)
    out = {n: dict(v, finite=v["finite"] and all(bool(torch.isfinite(p).all()) for p in module.parameters())) for n, v in out.items()}
    return dict(variants=out, skipped=skipped, memory_method=probe.method,
                param_bytes=sum(p.numel() * p.element_size() for p in module.parameters()))


# -- processes ----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, cfg_dict: dict, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS=str(cfg_dict["threads"]))
    try:
        cfg = BenchConfig(**cfg_dict)
        torch.set_num_threads(cfg.threads)
        torch.set_num_interop_threads(1)
        cuda = cfg.torch_device.type == "cuda"
        if cuda:
            torch.cuda.set_device(rank)
            cfg = dataclasses.replace(cfg, device=f"cuda:{rank}")
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world_size)
        queue.put((rank, "ok", measure(cfg, rank=rank, world_size=world_size)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_world(cfg: BenchConfig, world_size: int) -> list[dict]:
    """Run :func:`measure` on ``world_size`` spawned processes; one result per rank."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    cfg_dict = dataclasses.asdict(cfg)
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, cfg_dict, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = [None] * world_size, []
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=cfg.timeout_s)
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
            else:
                results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError(f"world size {world_size} failed:\n" + "\n".join(errors))
    return results


# -- aggregation --------------------------------------------------------------------------------
def _per_step_max(per_rank: list[list[float]]) -> list[float]:
    return [max(ts) for ts in zip(*per_rank)]


def _paired_ratio(times: list[float], sgd: list[float], per_round: int) -> float:
    """Median over rounds of (this variant's mean step / SGD's mean step in the same round):
    a slow spell of a shared machine cancels when it spans both."""
    rounds = range(0, min(len(times), len(sgd)), per_round)
    return statistics.median(statistics.mean(times[i:i + per_round]) / statistics.mean(sgd[i:i + per_round]) for i in rounds)


def summarize(cfg: BenchConfig, world_size: int, ranks: list[dict]) -> list[dict]:
    """One record per variant at this world size (see ``benchmarks/README.md`` for the fields)."""
    records, times_of = [], {}
    for name, rank0 in ranks[0]["variants"].items():
        times = times_of[name] = _per_step_max([r["variants"][name]["times"] for r in ranks])
        v = parse_variant(name, cfg.batch_size, world_size, cfg)
        median = statistics.median(times)
        q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [median] * 9
        calls, nbytes = rank0["calls"], rank0["bytes"]
        peaks = [r["variants"][name]["peak_memory_bytes"] for r in ranks]
        records.append(dict(
            variant=name, world_size=world_size, optimizer=v.optimizer or "sgd", ascent=v.ascent if v.optimizer else None,
            m=v.m, micro_batch_size=v.micro_batch_size, batch_per_worker=cfg.batch_size, global_batch=world_size * cfg.batch_size,
            step_time_s=dict(median=median, p10=q[0], p90=q[-1], min=min(times), n=len(times)), step_times_s=times,
            img_per_s=world_size * cfg.batch_size / median,
            allreduce_calls_per_step=None if calls[0] is None else statistics.mean(calls),
            allreduce_bytes_per_step=None if nbytes[0] is None else statistics.mean(nbytes),
            peak_memory_mb=None if None in peaks else max(peaks) / 2**20,
            finite=all(r["variants"][name]["finite"] for r in ranks),
        ))
    sgd = next(r for r in records if r["variant"] == "sgd")
    for r in records:
        r["step_time_ratio_vs_sgd"] = r["step_time_s"]["median"] / sgd["step_time_s"]["median"]
        r["step_time_ratio_vs_sgd_paired"] = _paired_ratio(times_of[r["variant"]], times_of["sgd"], cfg.steps_per_round)
        r["allreduce_bytes_ratio_vs_sgd"] = (r["allreduce_bytes_per_step"] / sgd["allreduce_bytes_per_step"]
                                             if sgd["allreduce_bytes_per_step"] else None)
    return records


def scaling(records: list[dict]) -> list[dict]:
    """Weak-scaling efficiency per variant: img/s at ``n`` over ``n x`` img/s at world size 1."""
    one = {r["variant"]: r for r in records if r["world_size"] == 1}
    return [dict(variant=r["variant"], world_size=r["world_size"],
                 efficiency=r["img_per_s"] / (r["world_size"] * one[r["variant"]]["img_per_s"]))
            for r in records if r["world_size"] > 1 and r["variant"] in one]


def checks(records: list[dict]) -> list[dict]:
    """The promises of SPEC.md §5 that this run can check, per world size."""
    out = []
    for n in sorted({r["world_size"] for r in records}):
        at = {r["variant"]: r for r in records if r["world_size"] == n}

        def add(check: str, target: str, value: float, ok: bool) -> None:
            out.append(dict(check=check, world_size=n, target=target, value=value, ok=ok))

        def ratio(a: str, b: str, paired: bool = False) -> float | None:
            if a not in at or b not in at:
                return None
            key = "step_time_ratio_vs_sgd_paired" if paired else "step_time_ratio_vs_sgd"  # x/sgd over y/sgd
            return at[a][key] / at[b][key]

        for a, b, limit in (("sam-local", "sgd", 2.05), ("rwsam-fd", "sam-local", 1.10), ("rwsam-last_layer", "sam-local", 1.03)):
            value = ratio(a, b)
            if value is None:
                continue  # a variant of the pair was not in this run
            add(f"step time {a}/{b}", f"<= {limit}", value, value <= limit)
            out[-1]["value_paired"] = ratio(a, b, paired=True)
        sgd_bytes = at["sgd"]["allreduce_bytes_per_step"]
        for name, r in at.items():
            if name == "sgd" or sgd_bytes is None:
                continue
            factor = 2 if r["ascent"] == "global" else 1
            add(f"all-reduce bytes {name}/sgd", f"== {factor}", r["allreduce_bytes_ratio_vs_sgd"],
                r["allreduce_bytes_per_step"] == factor * sgd_bytes)
    return out


def machine(cfg: BenchConfig) -> dict[str, Any]:
    """What the numbers were measured on."""
    import platform

    info: dict[str, Any] = dict(device=cfg.torch_device.type, torch=torch.__version__, python=platform.python_version(),
                                platform=platform.platform(), cpu_count=os.cpu_count(), threads_per_process=cfg.threads,
                                interop_threads=1, load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), None)
    except OSError:
        info["cpu_model"] = platform.processor() or None
    if cfg.torch_device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, gpu_count=torch.cuda.device_count())
    return info


def run_sweep(cfg: BenchConfig, out_dir: str, plots: bool = True) -> dict[str, Any]:
    """Every world size, then the JSON, the markdown table and (optionally) the plots."""
    started = time.time()
    info = machine(cfg)
    records, skipped, method = [], {}, None
    for n in cfg.world_sizes:
        print(f"[bench] {cfg.name}: world size {n}, {len(cfg.variants)} variants ...", flush=True)
        ranks = run_world(cfg, n)
        records += summarize(cfg, n, ranks)
        skipped, method = ranks[0]["skipped"], ranks[0]["memory_method"]
        param_mb = ranks[0]["param_bytes"] / 2**20
    info["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result = dict(
        schema=SCHEMA, name=cfg.name, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), wall_time_s=time.time() - started,
        config=dataclasses.asdict(cfg), machine=info, model_param_mb=param_mb, memory_method=method, skipped=skipped,
        records=records, scaling=scaling(records), checks=checks(records),
    )
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{cfg.name}.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    from . import plots as plot_mod

    result["files"] = [path] + plot_mod.write_all(result, out_dir, figures=plots)
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-sam bench",
                                description="Step time, img/s, all-reduce calls/bytes and peak memory per SAM variant.")
    p.add_argument("--config", default=None, help="YAML config (benchmarks/configs/*.yaml); defaults otherwise")
    p.add_argument("--out", default=RESULTS_DIR, help=f"output folder (default {RESULTS_DIR})")
    p.add_argument("--name", default=None, help="override the config's name (output file stem)")
    p.add_argument("--world-sizes", default=None, help="comma-separated, e.g. 1,2")
    p.add_argument("--variants", default=None, help="comma-separated variant names")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dist-sam bench`` and ``python -m benchmarks.run``."""
    args = _parser().parse_args(argv)
    split = lambda s, f=str: None if s is None else tuple(f(x) for x in s.split(",") if x)  # noqa: E731
    try:
        cfg = load_config(args.config, name=args.name, world_sizes=split(args.world_sizes, int),
                          variants=split(args.variants), steps=args.steps, threads=args.threads)
    except (ValueError, OSError) as err:
        print(f"dist-sam bench: {err}", file=sys.stderr)
        return 2
    result = run_sweep(cfg, args.out, plots=not args.no_plots)
    from .plots import markdown_table

    print(markdown_table(result))
    print("wrote " + ", ".join(result["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
