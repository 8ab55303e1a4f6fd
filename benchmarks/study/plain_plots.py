"""The plain m-sharpness study's table and figure (``benchmarks.study.plain``)."""

from __future__ import annotations

from ..common import output

__all__ = ["study_markdown", "study_figure"]


def study_markdown(result: dict) -> str:
    """The study as markdown: accuracy mean ± std and SGN-covariance trace per variant and noise."""
    cfg = result["config"]
    lines = [f"## m-sharpness study `{result['name']}`", "", result["description"], "",
             "| variant | mapping | m | " + " | ".join(f"acc % ({int(100 * p)}% noise) | tr Σ ({int(100 * p)}% noise)" for p in cfg["noise"])
             + " | cpu-s/epoch | x SGD |", "|---|---|---|" + "---|---|" * len(cfg["noise"]) + "---|---|"]
    cost = {v["name"]: sum(s["cpu_s_per_epoch"] for s in result["summary"] if s["variant"] == v["name"]) / len(cfg["noise"])
            for v in result["variants"]}
    for v in result["variants"]:
        cells = []
        for p in cfg["noise"]:
            s = next(s for s in result["summary"] if s["variant"] == v["name"] and s["noise"] == p)
            cells += [f"{100 * s['test_acc_mean']:.2f} ± {100 * s['test_acc_std']:.2f}", f"{s['sgn_trace_mean']:.3g} ± {s['sgn_trace_std']:.2g}"]
        sgd = cost.get("sgd")
        cells += [f"{cost[v['name']]:.2f}", f"{cost[v['name']] / sgd:.1f}" if sgd else "n/a"]
        lines.append(f"| {v['name']} | {v['mapping']} | {v['m'] or '-'} | " + " | ".join(cells) + " |")
    lines += ["", f"{cfg['seeds']} seeds per cell (mean ± sample std); wall time {result['wall_time_s'] / 60:.1f} min "
              f"on {result['machine']['cpu_count']} cores ({cfg['workers']} worker processes, 1 thread each)."]
    if result.get("notes"):
        lines += [""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def study_figure(result: dict, path: str) -> None:
    """Two panels: test accuracy (mean ± std) and SGN-covariance trace, per variant and noise."""
    plt = output.pyplot()
    names = [v["name"] for v in result["variants"]]
    labels = [v["name"] + (f" (m={v['m']})" if v["m"] else "") for v in result["variants"]]
    acc, acc_err, trace, trace_err = {}, {}, {}, {}
    for s in result["summary"]:
        label = f"{int(100 * s['noise'])}% label noise"
        acc.setdefault(label, {})[s["variant"]] = 100 * s["test_acc_mean"]
        acc_err.setdefault(label, {})[s["variant"]] = (100 * (s["test_acc_mean"] - s["test_acc_std"]), 100 * (s["test_acc_mean"] + s["test_acc_std"]))
        trace.setdefault(label, {})[s["variant"]] = s["sgn_trace_mean"]
        trace_err.setdefault(label, {})[s["variant"]] = (s["sgn_trace_mean"] - s["sgn_trace_std"], s["sgn_trace_mean"] + s["sgn_trace_std"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    output.bars(a, names, acc, acc_err, labels)
    lows = [v for g in acc.values() for v in g.values()]
    a.set_ylim(max(0.0, min(lows) - 5), min(100.0, max(lows) + 2))
    a.set_ylabel("test accuracy, % (mean ± std)")
    a.legend(fontsize=8)
    output.bars(b, names, trace, trace_err, labels)
    b.set_ylabel("SGN covariance trace at the end")
    b.set_yscale("log")
    fig.suptitle(f"{result['name']}: m-sharpness on digits")
    output.save_figure(fig, path)
