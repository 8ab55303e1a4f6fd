"""The lent-GPU check (``benchmarks/gpu_check.sh``): every CUDA path of dist-sam in one <= 8-minute run.

    OUT=/tmp/out bash benchmarks/gpu_check.sh                  # on the GPU machine (<= 8 minutes)
    python -m benchmarks.gpu.check --dry-run --out /tmp/out     # the same code, tiny, on CPU

ResNet-50, 224px, bf16 autocast, channels_last, batch 256 (b), on one GPU. The sections run in the
order of :data:`SECTIONS` (cheap and certain first, compilation last) and ``$OUT/gpu_check.json``
is rewritten after each one, so a timeout keeps the finished ones; a section that would start
after ``--budget-s`` is recorded as skipped. The functions are in ``benchmarks.gpu.sections``.

1. ``correctness``: SGD, SAM-local, RW-SAM ``fd`` and ``last_layer``, m-SAM at m = b/4 sequential
   and batched (``micro_impl="vmap"``): 3 steps at lr 0.1 on a fresh model; loss and weights
   finite, weights moved. The timing sections need it to pass.
2. ``throughput_eager``: img/s of those variants, interleaved (``benchmarks.throughput.harness.measure``, no
   DDP), median of 20 steps, peak ``max_memory_allocated``; ratios (vmap / sequential m-SAM too).
3. ``fp16_scaler``: SAM-local under fp16 autocast with ``GradScaler``; an inf batch must skip the
   step and lower the scale; img/s.
4. ``ddp_dali_trainer``: the trainer wrapped in DDP at world size 1 over NCCL, 2 short epochs of
   SAM-local on synthetic JPEGs decoded by DALI ``mixed`` (nvJPEG).
5. ``dali``: the loader's img/s on the same JPEGs after a warm-up epoch.
   ``looksam``, ``look_msam``, ``msam_vmap``: LookSAM, look-m-SAM and batched m-SAM against
   SAM-local at per-device batch 128, m = 16 (``benchmarks.gpu.cheap``), after ``throughput_eager``.
   ``fsdp2``: ``benchmarks.gpu.fsdp`` (FSDP2 at world size 1, resident and lean).
6. ``throughput_compiled`` / ``throughput_compiled_rwsam``: as 2 through ``torch.compile``
   (inductor; warm-up compiles, ``wall_s`` includes it). Batched m-SAM is not repeated: it runs
   the eager module.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, NamedTuple

import torch

from ..common import output
from . import cheap, sections
from .sections import VARIANTS, check_correctness, dali_throughput, time_variants

__all__ = ["SECTIONS", "Section", "check_correctness", "time_variants", "dali_throughput", "main"]

SCHEMA = "dist-sam-gpu-check/2"
FULL = dict(model="resnet50", image_size=224, num_classes=1000, batch_size=256, steps=20, warmup=3, compile_backend="inductor",
            dali_images=3072, dali_image_size=320, dali_batch=256, dali_threads=8, dali_epochs=4, trainer_batch=256,
            sam_batch=128, sam_m=16)
DRY = dict(model="small_cnn", image_size=16, num_classes=10, batch_size=8, steps=2, warmup=1, compile_backend="aot_eager",
           dali_images=100, dali_image_size=32, dali_batch=8, dali_threads=2, dali_epochs=2, trainer_batch=16,
           sam_batch=8, sam_m=2)


class Section(NamedTuple):
    """One entry of :data:`SECTIONS`: ``run(opts, device, workdir)`` returns plain data;
    ``needs`` names a section whose ``ok`` must be true; ``dali`` sections skip with --skip-dali."""

    name: str
    run: Callable[[dict, str, str], dict[str, Any]]
    needs: str | None = None
    dali: bool = False


SECTIONS: list[Section] = [
    Section("correctness", sections.check_correctness),
    Section("throughput_eager", sections.time_variants, needs="correctness"),
    Section("looksam", cheap.looksam, needs="correctness"),
    Section("look_msam", cheap.look_msam, needs="correctness"),
    Section("msam_vmap", cheap.msam_vmap, needs="correctness"),
    Section("fp16_scaler", sections.fp16_scaler),
    Section("ddp_dali_trainer", sections.ddp_trainer),
    Section("dali", sections.dali_throughput, dali=True),
    Section("fsdp2", lambda opts, device, workdir: _fsdp2(device)),
    # DeepSpeed fp16 runs first, in a process of its own: gpu_check.sh -> benchmarks.gpu.deepspeed_fp16.
    Section("throughput_compiled", sections.time_compiled, needs="correctness"),
    Section("throughput_compiled_rwsam", sections.time_compiled_rwsam, needs="correctness"),
]


def _machine(device: str) -> dict[str, Any]:
    try:
        import nvidia.dali

        dali = nvidia.dali.__version__
    except ImportError:
        dali = None
    cudnn = torch.backends.cudnn.version() if device == "cuda" else None
    return output.machine(device, threads=torch.get_num_threads(), cudnn=cudnn, dali=dali)


def _fsdp2(device: str) -> dict[str, Any]:
    """``benchmarks.gpu.fsdp``: FSDP2 at world size 1, resident and lean memory modes."""
    from . import fsdp

    return fsdp.run(dry_run=device != "cuda")


def _run_section(section: Section, result: dict, opts: dict, device: str, workdir: str, t_start: float, budget_s: float) -> None:
    needed = result.get(section.needs, {}) if section.needs else {}
    if section.needs and not needed.get("ok"):
        result["errors"][section.name] = f"skipped: the {section.needs} section did not pass"
        return
    if time.perf_counter() - t_start > budget_s:
        result["skipped"][section.name] = f"out of time: {budget_s:.0f}s budget spent before it started"
        return
    t0 = time.perf_counter()
    try:
        result[section.name] = section.run(opts, device, workdir)
        if result[section.name].get("ok") is False:
            result["errors"][section.name] = "its checks failed (see the section)"
    except Exception:  # noqa: BLE001 - recorded; the next section still runs
        result["errors"][section.name] = traceback.format_exc()
    result["seconds"][section.name] = time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    """Run the sections in order, rewriting the JSON after each; exit 1 if any failed."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu.check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="output folder (default $OUT)")
    p.add_argument("--dry-run", action="store_true", help="tiny model and data on CPU: checks the script, not the GPU")
    p.add_argument("--skip-dali", action="store_true", help="skip the sections that need DALI")
    p.add_argument("--only", default=None, help="comma-separated section names to run (default: all)")
    p.add_argument("--budget-s", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", 330)),
                   help="start no section after this many seconds (default 330, $GPU_CHECK_BUDGET_S)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("gpu_check: no CUDA device; use --dry-run to exercise the script on CPU", file=sys.stderr)
        return 2
    device, opts = ("cuda", FULL) if cuda else ("cpu", DRY)
    only = None if args.only is None else set(args.only.split(","))
    unknown = (only or set()) - {s.name for s in SECTIONS}
    if unknown:
        print(f"gpu_check: unknown sections {sorted(unknown)}; known: {[s.name for s in SECTIONS]}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_check.json")
    result: dict[str, Any] = dict(schema=SCHEMA, dry_run=args.dry_run, started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                  machine=_machine(device), options=opts, errors={}, skipped={}, seconds={})
    workdir = tempfile.mkdtemp(prefix="gpu_check_")
    t_start = time.perf_counter()
    try:
        for section in SECTIONS:
            if (only is not None and section.name not in only) or (section.dali and args.skip_dali):
                continue
            _run_section(section, result, opts, device, workdir, t_start, args.budget_s)
            result["total_s"] = time.perf_counter() - t_start
            output.write_json(result, path)
            state = "ERROR" if section.name in result["errors"] else "skipped" if section.name in result["skipped"] else "done"
            print(f"[gpu_check] {section.name}: {state} in {result['seconds'].get(section.name, 0.0):.1f}s", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = {k: result.get(k) for k in ("throughput_eager", "throughput_compiled", "fp16_scaler", "ddp_dali_trainer")}
    print(json.dumps(summary, indent=1, default=str)[:4000])
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
