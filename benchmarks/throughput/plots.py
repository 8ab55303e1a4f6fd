"""Tables and figures from a sweep's JSON (``benchmarks.throughput``).

    python -m benchmarks.throughput.plots benchmarks/results/cpu.json      # rewrite cpu.md and the PNGs
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from ..common import output

__all__ = ["markdown_table", "write_all", "main"]


def _fmt(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "**NO**"
    return format(value, spec)


def markdown_table(result: dict) -> str:
    """The sweep as markdown: machine, one table per world size, the targets, scaling."""
    m, cfg = result["machine"], result["config"]
    lines = [
        f"## Sweep `{result['name']}`: {cfg['model']} {cfg['image_size']}px, batch {cfg['batch_size']}/worker",
        "",
        f"Machine: {m['device'].upper()} ({m.get('gpu') or m.get('cpu_model')}), {m['cpu_count']} cores, torch {m['torch']}, "
        f"{m['threads_per_process']} thread(s) per process; load average at start {_loads(m.get('load_average'))}, "
        f"at end {_loads(m.get('load_average_end'))}. Step time: median over {cfg['steps']}+ interleaved steps "
        f"of the slowest rank{' (quick smoke run)' if cfg.get('quick') else ''}; paired: the median over rounds of the ratio of the two variants' mean step in that round. Peak memory: {result['memory_method'] or 'n/a'}.",
    ]
    for n in sorted({r["world_size"] for r in result["records"]}):
        lines += ["", f"### World size {n}", "",
                  "| variant | m | step ms (p10-p90) | x SGD | x SGD paired | img/s | all-reduces/step | MB/step | x SGD bytes | peak MB | finite |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in result["records"] if r["world_size"] == n):
            t = r["step_time_s"]
            mb = None if r["allreduce_bytes_per_step"] is None else r["allreduce_bytes_per_step"] / 2**20
            lines.append(
                f"| {r['variant']} | {r['m'] or '-'} | {1e3 * t['median']:.1f} ({1e3 * t['p10']:.1f}-{1e3 * t['p90']:.1f}) "
                f"| {r['step_time_ratio_vs_sgd']:.2f} | {_fmt(r.get('step_time_ratio_vs_sgd_paired'))} | {r['img_per_s']:.1f} | {_fmt(r['allreduce_calls_per_step'], '.0f')} "
                f"| {_fmt(mb, '.1f')} | {_fmt(r['allreduce_bytes_ratio_vs_sgd'])} | {_fmt(r['peak_memory_mb'], '.0f')} | {_fmt(r['finite'])} |")
    if result["checks"]:
        lines += ["", "### Targets (SPEC.md §5)", "", "| check | world size | target | measured | paired | met |", "|---|---|---|---|---|---|"]
        lines += [f"| {c['check']} | {c['world_size']} | {c['target']} | {_fmt(c['value'], '.3f')} | {_fmt(c.get('value_paired'), '.3f')} | {_fmt(c['ok'])} |"
                  for c in result["checks"]]
    pairs = [r for r in result["records"] if "compiled_vs_eager" in r]
    if pairs:
        lines += ["", "### Compiled against eager (the same variant, same run)", "",
                  "| variant | world size | compiled / eager | paired |", "|---|---|---|---|"]
        lines += [f"| {r['variant'][:-len('+compiled')]} | {r['world_size']} | {r['compiled_vs_eager']:.2f} "
                  f"| {r['compiled_vs_eager_paired']:.2f} |" for r in pairs]
    if result["scaling"]:
        lines += ["", "### Scaling efficiency (img/s at n / (n x img/s at 1))", "", "| variant | world size | efficiency |", "|---|---|---|"]
        lines += [f"| {s['variant']} | {s['world_size']} | {s['efficiency']:.2f} |" for s in result["scaling"]]
    if result.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{k} ({v})" for k, v in result["skipped"].items())]
    return "\n".join(lines) + "\n"


def _loads(values: list | None) -> str:
    return "n/a" if not values else "/".join(f"{v:.1f}" for v in values)


def _throughput_vs_m(result: dict, path: str) -> None:
    plt = output.pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4))
    for n in sorted({r["world_size"] for r in result["records"]}):
        at = [r for r in result["records"] if r["world_size"] == n]
        micro = sorted((r["m"], r["img_per_s"]) for r in at if r["variant"].startswith("msam-") and "+" not in r["variant"])
        if micro:
            line, = ax.plot(*zip(*micro), "o-", label=f"m-SAM, world size {n}")
            for r in at:
                if r["variant"] == "sam-global":
                    ax.plot([r["m"]], [r["img_per_s"]], "s", color=line.get_color(), markersize=8, label=f"SAM-global (m = n b), world size {n}")
                elif r["variant"] == "sgd":
                    ax.axhline(r["img_per_s"], color=line.get_color(), ls="--", lw=1, label=f"SGD, world size {n}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("m (samples per ascent)")
    ax.set_ylabel("img/s (all workers)")
    ax.set_title(f"{result['name']}: throughput vs m")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    output.save_figure(fig, path)


def _step_time(result: dict, path: str) -> None:
    plt = output.pyplot()
    names = list(dict.fromkeys(r["variant"] for r in result["records"]))
    groups, errs = {}, {}
    for r in result["records"]:
        label = f"world size {r['world_size']}"
        t = r["step_time_s"]
        groups.setdefault(label, {})[r["variant"]] = 1e3 * t["median"]
        errs.setdefault(label, {})[r["variant"]] = (1e3 * t["p10"], 1e3 * t["p90"])
    fig, ax = plt.subplots(figsize=(8, 4))
    output.bars(ax, names, groups, errs)
    ax.set_ylabel("step time, ms (median, p10-p90)")
    ax.set_title(f"{result['name']}: step time by variant")
    _save(plt, fig, ax, path)


def _scaling(result: dict, path: str) -> None:
    plt = output.pyplot()
    names = list(dict.fromkeys(s["variant"] for s in result["scaling"]))
    groups: dict[str, dict[str, float]] = {}
    for s in result["scaling"]:
        groups.setdefault(f"world size {s['world_size']}", {})[s["variant"]] = s["efficiency"]
    fig, ax = plt.subplots(figsize=(8, 4))
    output.bars(ax, names, groups)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_ylabel("img/s at n / (n x img/s at 1)")
    ax.set_title(f"{result['name']}: weak-scaling efficiency")
    _save(plt, fig, ax, path)


def _save(plt, fig, ax, path: str) -> None:
    ax.legend(fontsize=8)
    output.save_figure(fig, path)


def write_all(result: dict, out_dir: str, figures: bool = True) -> list[str]:
    """Write ``<name>.md`` and (with ``figures``) the three PNGs; return the paths written."""
    stem = os.path.join(out_dir, result["name"])
    with open(stem + ".md", "w") as fh:
        fh.write(markdown_table(result))
    written = [stem + ".md"]
    if figures:
        for suffix, draw in (("throughput_vs_m", _throughput_vs_m), ("step_time", _step_time), ("scaling", _scaling)):
            if suffix == "scaling" and not result["scaling"]:
                continue
            draw(result, f"{stem}_{suffix}.png")
            written.append(f"{stem}_{suffix}.png")
    return written


def main(argv: list[str] | None = None) -> int:
    """Rewrite the markdown and figures of a results JSON."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m benchmarks.throughput.plots RESULTS.json", file=sys.stderr)
        return 2
    with open(argv[0]) as fh:
        result = json.load(fh)
    out_dir = os.path.dirname(os.path.abspath(argv[0]))
    print("wrote " + ", ".join(write_all(result, out_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
