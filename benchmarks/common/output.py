"""What every benchmark writes: JSON results, PNG figures, and a description of the machine."""

from __future__ import annotations

import json
import os
import platform
from typing import Any

import torch

__all__ = ["RESULTS_DIR", "write_json", "pyplot", "save_figure", "bars", "machine", "redraw"]

#: Where results are written by default: ``benchmarks/results``.
RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")


def write_json(obj: Any, path: str, indent: int = 1) -> str:
    """Write ``obj`` as JSON to ``path`` (its folder created); return ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=indent, default=str)
    return path


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str, dpi: int = 110) -> str:
    """Lay out, save and close ``fig``; return ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def bars(ax, names: list[str], groups: dict[str, dict[str, float]], errs: dict[str, dict[str, tuple]] | None = None,
          labels: list[str] | None = None) -> None:
    """Grouped bars on ``ax``: one group per ``names`` entry, one bar per ``groups`` key; ``errs``
    gives each bar's ``(low, high)``."""
    width = 0.8 / max(1, len(groups))
    for k, (label, values) in enumerate(groups.items()):
        xs = [i + (k - (len(groups) - 1) / 2) * width for i in range(len(names))]
        ys = [values.get(n, 0.0) for n in names]
        yerr = None
        if errs:
            lo_hi = [errs[label].get(n, (y, y)) for n, y in zip(names, ys)]
            yerr = [[y - lo for (lo, _), y in zip(lo_hi, ys)], [hi - y for (_, hi), y in zip(lo_hi, ys)]]
        ax.bar(xs, ys, width, yerr=yerr, capsize=2, label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(labels or names, rotation=45, ha="right", fontsize=8)


def redraw(argv: list[str] | None, prog: str, markdown, figure) -> int:
    """The ``python -m <prog> RESULTS.json`` command line: rewrite ``<name>.md`` and ``<name>.png``
    beside a results JSON with ``markdown(result) -> str`` and ``figure(result, path)``."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print(f"usage: python -m {prog} RESULTS.json", file=sys.stderr)
        return 2
    with open(argv[0]) as fh:
        result = json.load(fh)
    stem = os.path.join(os.path.dirname(os.path.abspath(argv[0])), result["name"])
    with open(stem + ".md", "w") as fh:
        fh.write(markdown(result))
    figure(result, stem + ".png")
    print(f"wrote {stem}.md, {stem}.png")
    return 0


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), None)
    except OSError:
        return platform.processor() or None


def machine(device: str | torch.device = "cpu", **extra: Any) -> dict[str, Any]:
    """What the numbers were measured on: versions, CPU, load, and the GPU for a CUDA device."""
    info: dict[str, Any] = dict(device=torch.device(device).type, torch=torch.__version__,
                                python=platform.python_version(), platform=platform.platform(),
                                cpu_model=_cpu_model(), cpu_count=os.cpu_count(),
                                load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)
    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gb=p.total_memory / 2**30, capability=f"{p.major}.{p.minor}",
                    cuda=torch.version.cuda, gpu_count=torch.cuda.device_count())
    return {**info, **extra}
