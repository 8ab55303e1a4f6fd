"""Tables and the Pareto figure of the cost grid's JSON (``benchmarks.study.cost``).

    python -m benchmarks.study.cost_plots benchmarks/results/study_cost.json   # rewrite .md and .png
"""

from __future__ import annotations

import sys

from ..common.output import pyplot as _pyplot, redraw, save_figure
from .cost_select import setting_key

__all__ = ["cost_markdown", "cost_figure", "main"]


def _pct(mean, std=None) -> str:
    if mean is None:
        return "n/a"
    return f"{100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def _cost_cell(timing: dict | None, method: str) -> str:
    t = (timing or {}).get("methods", {}).get(method)
    if not t:
        return "n/a"
    off = f" (off-step {t['off_step_ratio_vs_sgd']:.2f})" if "off_step_ratio_vs_sgd" in t else ""
    return f"{t['ratio_vs_sgd']:.2f}{off}"


def _passes(timing: dict | None, method: str) -> str:
    t = (timing or {}).get("methods", {}).get(method)
    if not t:
        return "n/a | n/a"
    return f"{t['forward_per_step']:.2f} / {t['backward_per_step']:.2f} | {t['forward_calls_per_step']:.1f}"


def cost_markdown(result: dict) -> str:
    """Per noise level: each method at its validation-selected setting; then budgets, pairs, the grid."""
    cfg, timing = result["config"], result.get("timing")
    diff = {(d["method"], d["noise"]): d for d in result["paired_vs_sam_local"]}
    lines = [f"## Cost grid `{result['name']}`" + ("" if result.get("complete", True) else " (INCOMPLETE)"), "",
             result["description"], "",
             f"{cfg['seeds']} seeds, tuning on " + (f"the first {cfg['tune_seeds']}" if cfg["tune_seeds"] else "all of them") +
             f"; validation {cfg['val_size']} digits (noisy labels); rho grid {list(cfg['rho'])}, alpha {list(cfg['alpha'])}, "
             f"RW-SAM lam {list(cfg['lam'])}."]
    for noise in cfg["noise"]:
        lines += ["", f"### {int(100 * noise)}% label noise", "",
                  "| method | selected (by val) | seeds | test acc % | val acc % | − SAM-local (pts, ± SE, wins) | step time × SGD | "
                  "fwd / bwd passes per step | forward calls per step |", "|---|---|---|---|---|---|---|---|---|"]
        for s in (s for s in result["selected"] if s["noise"] == noise):
            d = diff.get((s["method"], noise))
            dcell = "-" if not d or d["diff_mean"] is None else (
                f"{100 * d['diff_mean']:+.2f} ± {100 * (d['diff_se'] or 0):.2f} ({d['wins']}/{d['n']})")
            edge = " (grid edge: " + ", ".join(s["at_grid_edge"]) + ")" if s["at_grid_edge"] else ""
            lines.append(f"| {s['method']} | {s['setting']}{edge} | {s['n']} | {_pct(s['test_acc_mean'], s['test_acc_std'])} | "
                         f"{_pct(s['val_acc_mean'])} | {dcell} | {_cost_cell(timing, s['method'])} | {_passes(timing, s['method'])} |")
    if result.get("budget_table"):
        lines += ["", "At step cost <= X (× SGD, this run's timing phase), the method of highest test accuracy at its "
                  "validation-selected setting:", "", "| noise | cost <= X | run | setting | its cost | test acc % |",
                  "|---|---|---|---|---|---|"]
        for b in result["budget_table"]:
            x = "any" if b["budget"] >= 1e8 else f"{b['budget']:g}"
            lines.append(f"| {int(100 * b['noise'])}% | {x} | {b['method']} | {b['setting']} | {b['cost']:.2f} | "
                         f"{_pct(b['test_acc_mean'], b['test_acc_std'])} |")
    lines += ["", "<details><summary>The tuning grid (validation / test accuracy over the tuning seeds)</summary>", "",
              "| method | noise | setting | seeds | val acc % | test acc % |", "|---|---|---|---|---|---|"]
    for s in result["selected"]:
        for row in s["grid"]:
            mark = " **(selected)**" if setting_key(row["params"]) == s["setting"] else ""
            lines.append(f"| {s['method']} | {int(100 * s['noise'])}% | {setting_key(row['params'])}{mark} | {row['n']} | "
                         f"{_pct(row['val_acc_mean'], row['val_acc_std'])} | {_pct(row['test_acc_mean'], row['test_acc_std'])} |")
    lines += ["", "</details>"]
    if timing:
        lines += ["", f"Timing phase: {timing['rounds']} interleaved rounds, load average "
                  f"{'/'.join(f'{v:.1f}' for v in timing['load_average'])} at its start (a shared machine: rerun "
                  "`python -m benchmarks.study --grid cost --phase time` on a quiet one)."]
    return "\n".join(lines) + "\n"


def cost_figure(result: dict, path: str) -> None:
    """Accuracy (mean ± std, at the validation-selected setting) against step time × SGD, one panel
    per noise level, with the Pareto front of the methods drawn as a step line."""
    plt = _pyplot()
    cfg, cost = result["config"], {m: t["ratio_vs_sgd"] for m, t in result["timing"]["methods"].items()}
    fig, axes = plt.subplots(1, len(cfg["noise"]), figsize=(6.2 * len(cfg["noise"]), 4.8), squeeze=False)
    for ax, noise in zip(axes[0], cfg["noise"]):
        rows = sorted((s for s in result["selected"] if s["noise"] == noise and s["method"] in cost), key=lambda s: cost[s["method"]])
        for i, s in enumerate(rows):
            ax.errorbar(cost[s["method"]], 100 * s["test_acc_mean"], yerr=100 * (s["test_acc_std"] or 0), fmt="o",
                        color=f"C{i % 10}", capsize=3, label=f"{s['method']} ({s['setting']})")
        front, best = [], -1.0
        for s in rows:
            if s["test_acc_mean"] > best:
                best = s["test_acc_mean"]
                front.append((cost[s["method"]], 100 * best))
        if front:
            ax.step(*zip(*front), where="post", color="gray", lw=1, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("step time, × SGD (interleaved, this machine)")
        ax.set_ylabel("test accuracy, % (mean ± std over seeds)")
        ax.set_title(f"{int(100 * noise)}% label noise", fontsize=9)
        ax.legend(fontsize=6, loc="lower right")
    fig.suptitle(f"{result['name']}: accuracy per cost at validation-tuned settings", fontsize=10)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    """Rewrite the markdown and figure of a cost grid's JSON."""
    return redraw(argv, "benchmarks.study.cost_plots", cost_markdown, cost_figure)


if __name__ == "__main__":
    sys.exit(main())
