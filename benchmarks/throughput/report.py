"""The sweep's results: per-variant summaries, SGD ratios, scaling efficiency, SPEC.md checks, files.

``summarize`` turns the raw per-rank timings of ``harness.run_world`` into one record
per variant (ratios against SGD measured in the same run); ``scaling`` and ``checks`` derive the
weak-scaling efficiency and the SPEC.md §5 targets; ``write_result`` writes ``<name>.json`` and,
through ``plots``, the markdown table and the figures.
"""

from __future__ import annotations

import os
import statistics
from typing import Any

from ..common import output
from ..common.timing import paired_ratio, stats
from .config import BenchConfig, parse_variant

__all__ = ["SCHEMA", "summarize", "scaling", "checks", "machine", "write_result"]

SCHEMA = "dist-sam-bench/1"

def _per_step_max(per_rank: list[list[float]]) -> list[float]:
    return [max(ts) for ts in zip(*per_rank)]


def summarize(cfg: BenchConfig, world_size: int, ranks: list[dict]) -> list[dict]:
    """One record per variant at this world size (see ``benchmarks/README.md`` for the fields)."""
    records, times_of = [], {}
    for name, rank0 in ranks[0]["variants"].items():
        times = times_of[name] = _per_step_max([r["variants"][name]["times"] for r in ranks])
        v = parse_variant(name, cfg.batch_size, world_size, cfg)
        step = stats(times)
        calls, nbytes = rank0["calls"], rank0["bytes"]
        peaks = [r["variants"][name]["peak_memory_bytes"] for r in ranks]
        records.append(dict(
            variant=name, world_size=world_size, optimizer=v.optimizer or "sgd", ascent=v.ascent if v.optimizer else None,
            m=v.m, micro_batch_size=v.micro_batch_size, batch_per_worker=cfg.batch_size, global_batch=world_size * cfg.batch_size,
            step_time_s=step, step_times_s=times, img_per_s=world_size * cfg.batch_size / step["median"],
            allreduce_calls_per_step=None if calls[0] is None else statistics.mean(calls),
            allreduce_bytes_per_step=None if nbytes[0] is None else statistics.mean(nbytes),
            allreduce_bytes_range=None if nbytes[0] is None else [min(nbytes), max(nbytes)],
            peak_memory_mb=None if None in peaks else max(peaks) / 2**20,
            finite=all(r["variants"][name]["finite"] for r in ranks),
        ))
    sgd = next(r for r in records if r["variant"] == "sgd")
    for r in records:
        r["step_time_ratio_vs_sgd"] = r["step_time_s"]["median"] / sgd["step_time_s"]["median"]
        r["step_time_ratio_vs_sgd_paired"] = paired_ratio(times_of[r["variant"]], times_of["sgd"], cfg.steps_per_round)
        r["allreduce_bytes_ratio_vs_sgd"] = (r["allreduce_bytes_per_step"] / sgd["allreduce_bytes_per_step"]
                                             if sgd["allreduce_bytes_per_step"] else None)
        eager = r["variant"][:-len("+compiled")] if r["variant"].endswith("+compiled") else None
        if eager in times_of:  # compiled against eager, the same variant in the same rounds
            r["compiled_vs_eager"] = r["step_time_s"]["median"] / statistics.median(times_of[eager])
            r["compiled_vs_eager_paired"] = paired_ratio(times_of[r["variant"]], times_of[eager], cfg.steps_per_round)
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

        for a, b, limit in (("sam-local", "sgd", 2.05), ("rwsam-fd", "sam-local", 1.10), ("rwsam-last_layer", "sam-local", 1.03),
                            ("looksam-off", "sgd", 1.05), ("sgd+reuse", "sgd", 1.05), ("looksam-off", "sgd+reuse", 1.02)):
            value = ratio(a, b)
            if value is None:
                continue  # a variant of the pair was not in this run
            add(f"step time {a}/{b}", f"<= {limit}", value, value <= limit)
            out[-1]["value_paired"] = ratio(a, b, paired=True)
        sgd_bytes = at["sgd"]["allreduce_bytes_per_step"]
        for name, r in at.items():
            if name == "sgd" or sgd_bytes is None:
                continue
            if r["optimizer"] == "looksam" and name != "looksam-off":  # one more all-reduce on look steps only
                low, high = r["allreduce_bytes_range"]
                add(f"all-reduce bytes {name}/sgd, off and look steps", "== 1 and 2", high / sgd_bytes,
                    low == sgd_bytes and high == 2 * sgd_bytes)
                continue
            factor = 2 if r["ascent"] == "global" else 1
            add(f"all-reduce bytes {name}/sgd", f"== {factor}", r["allreduce_bytes_ratio_vs_sgd"],
                r["allreduce_bytes_per_step"] == factor * sgd_bytes)
    return out


def machine(cfg: BenchConfig) -> dict[str, Any]:
    """What the numbers were measured on."""
    return output.machine(cfg.torch_device, threads_per_process=cfg.threads, interop_threads=1)


def write_result(result: dict[str, Any], out_dir: str, plots: bool = True) -> list[str]:
    """``<out_dir>/<name>.json``, then ``<name>.md`` and (with ``plots``) the PNGs; the paths written."""
    path = output.write_json(result, os.path.join(out_dir, f"{result['name']}.json"))
    from . import plots as plot_mod

    return [path] + plot_mod.write_all(result, out_dir, figures=plots)
