"""The sweep's results: per-variant summaries, SGD ratios, scaling efficiency, SPEC.md checks, files.

``summarize`` turns the raw per-rank timings of ``benchmarks.harness.run_world`` into one record
per variant (ratios against SGD measured in the same run); ``scaling`` and ``checks`` derive the
weak-scaling efficiency and the SPEC.md §5 targets; ``write_result`` writes ``<name>.json`` and,
through ``benchmarks.plots``, the markdown table and the figures.
"""

from __future__ import annotations

import json
import os
import statistics
from typing import Any

import torch

from .config import BenchConfig, parse_variant

__all__ = ["SCHEMA", "summarize", "scaling", "checks", "machine", "write_result"]

SCHEMA = "dist-sam-bench/1"

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
        eager = r["variant"][:-len("+compiled")] if r["variant"].endswith("+compiled") else None
        if eager in times_of:  # compiled against eager, the same variant in the same rounds
            r["compiled_vs_eager"] = r["step_time_s"]["median"] / statistics.median(times_of[eager])
            r["compiled_vs_eager_paired"] = _paired_ratio(times_of[r["variant"]], times_of[eager], cfg.steps_per_round)
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


def write_result(result: dict[str, Any], out_dir: str, plots: bool = True) -> list[str]:
    """``<out_dir>/<name>.json``, then ``<name>.md`` and (with ``plots``) the PNGs; the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{result['name']}.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    from . import plots as plot_mod

    return [path] + plot_mod.write_all(result, out_dir, figures=plots)
