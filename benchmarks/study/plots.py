"""Tables and figures of a study grid's JSON (``benchmarks.study.grid``).

    python -m benchmarks.study.plots benchmarks/results/study_noise.json   # rewrite its .md and .png

Figures: accuracy against noise per variant (``noise``, ``asam``), against ``lam`` per
normalization with SAM's band (``lam``), accuracy and cost against ``m`` (``m``), accuracy and the
estimate's error per estimator (``estimator``); every grid with pairs adds "RW minus SAM" per cell,
mean ± standard error of the paired differences.
"""

from __future__ import annotations

import sys
import textwrap

from ..common.output import pyplot as _pyplot, redraw, save_figure

__all__ = ["grid_markdown", "tuned_markdown", "grid_figure", "main"]


def _pct(mean, std=None) -> str:
    if mean is None:
        return "n/a"
    return f"{100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def _params(p: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in p.items()) or "-"


def grid_markdown(result: dict) -> str:
    """Per-cell accuracy (mean ± std over seeds), cost, estimator error; then the paired differences."""
    cfg, task = result["config"], result["task"]
    est = any("est_median_rel_error_mean" in s for s in result["summary"])
    head = "| variant | settings | m | seeds | test acc % | train acc % (noisy labels) | cpu-s/epoch | × SGD |"
    head += " est. median rel. error | est. Spearman |" if est else ""
    lines = [f"## Study grid `{result['name']}`" + ("" if result.get("complete", True) else " (INCOMPLETE)"), "",
             cfg["description"], "", result["task_description"], "",
             f"Task: {task['train_size']} training digits, {task['epochs']} epochs, batch {task['batch_size']} = "
             f"{task['workers_simulated']} workers × {task['batch_size'] // task['workers_simulated']}, lr {task['lr']} cosine, "
             f"rho {task['rho']} (ASAM {task['asam_rho']}), RW-SAM lam {task['lam']}, {task['normalization']}, {task['estimator']}, "
             f"mu {task['mu']} unless the row says otherwise.", "", head, "|" + "---|" * (head.count("|") - 1)]
    for s in result["summary"]:
        row = (f"| {s['variant']} | {_params(s['params'])} | {s['m'] or '-'} | {s['n']} | {_pct(s['test_acc_mean'], s['test_acc_std'])} "
               f"| {_pct(s['train_acc_mean'])} | {s['cpu_s_per_epoch'] or 0:.3f} | "
               + (f"{s['cost_ratio_vs_sgd']:.2f}" if s.get("cost_ratio_vs_sgd") else "-") + " |")
        if est:
            e = s.get("est_median_rel_error_mean")
            row += (f" {e:.3f} ± {s['est_median_rel_error_std'] or 0:.3f} | {s['est_spearman_mean']:.3f} |" if e is not None else " - | - |")
        lines.append(row)
    if result["paired"]:
        lines += ["", "Paired differences (same seed: same data, initialization, batch order and shifts), test accuracy in points:", "",
                  "| variant − baseline | settings | seeds | mean diff ± SE | std | wins / ties |", "|---|---|---|---|---|---|"]
        for d in result["paired"]:
            mean = "n/a" if d["diff_mean"] is None else f"{100 * d['diff_mean']:+.2f}" + (
                "" if d["diff_se"] is None else f" ± {100 * d['diff_se']:.2f}")
            std = "n/a" if d["diff_std"] is None else f"{100 * d['diff_std']:.2f}"
            lines.append(f"| {d['variant']} − {d['baseline']} | {_params(d['params'])} | {d['n']} | {mean} | {std} | {d['wins']} / {d['ties']} |")
    m = result["machine"]
    lines += ["", f"Wall time {result['wall_time_s'] / 60:.1f} min, one process on one torch thread (nice {m.get('nice')}), "
              f"{m['cpu_count']} cores, load average {'/'.join(f'{v:.1f}' for v in m['load_average'])} at the start, "
              f"{'/'.join(f'{v:.1f}' for v in m['load_average_end'])} at the end."]
    lines += [f"- {n}" for n in result.get("notes", [])]
    return "\n".join(lines) + "\n"


def tuned_markdown(result: dict) -> str:
    """A tuned grid's JSON (``benchmarks.study.tuned``): each cell at its validation-selected setting,
    beside the grid's one setting; then the paired differences at the selected settings."""
    cfg, task, tuning = result["config"], result["task"], result["tuning"]
    grid_values = ", ".join(f"{k} {list(v)}" for k, v in tuning["values"].items())
    lines = [f"## Tuned grid `{result['name']}`" + ("" if result.get("complete", True) else " (INCOMPLETE)"), "",
             cfg["description"], "", result["description"], "",
             f"{cfg['seeds']} seeds, tuning on the first {tuning['tune_seeds']}; validation {tuning['val_size']} digits (noisy "
             f"labels); starting grid {grid_values}, an edge extended up to {tuning['extend']} times. Tuned: "
             + "; ".join(f"{v} {', '.join(k) or '-'}" for v, k in result["tuned"].items()) + ".", "",
             "| variant | cell | selected (by val) | values tried | seeds | test acc % | val acc % | test acc % at the grids' "
             "setting (tuning seeds) |", "|---|---|---|---|---|---|---|---|"]
    for s in result["selected"]:
        keys = result["tuned"][s["variant"]]
        tried = "; ".join(f"{k} " + "/".join(f"{v:g}" for v in sorted({row["params"][k] for row in s["grid"]})) for k in keys) or "-"
        default = {k: task[k] for k in keys}
        at_default = next((row for row in s["grid"] if row["params"] == default), None)
        edge = f" (grid edge: {', '.join(s['at_grid_edge'])})" if s["at_grid_edge"] else ""
        cell = _params({k: v for k, v in s["cell"].items()})
        lines.append(f"| {s['variant']} | {cell} | {s['setting']}{edge} | {tried} | {s['n']} | {_pct(s['test_acc_mean'], s['test_acc_std'])} "
                     f"| {_pct(s['val_acc_mean'])} | "
                     + (f"{_pct(at_default['test_acc_mean'])} ({s['setting'] == _setting(default) and 'selected' or _setting(default)})"
                        if at_default else "-") + " |")
    if result["paired"]:
        lines += ["", "Paired differences at the selected settings (same seed: same data, initialization, batch order and "
                  "shifts), test accuracy in points:", "", "| variant − baseline | cell | seeds | mean diff ± SE | wins |",
                  "|---|---|---|---|---|"]
        for d in result["paired"]:
            mean = "n/a" if d["diff_mean"] is None else f"{100 * d['diff_mean']:+.2f}" + (
                "" if d["diff_se"] is None else f" ± {100 * d['diff_se']:.2f}")
            lines.append(f"| {d['variant']} − {d['baseline_variant']} | {_params(d['cell'])} | {d['n']} | {mean} | {d['wins']} / {d['n']} |")
    m = result["machine"]
    lines += ["", f"One torch thread per process (nice {m.get('nice')}), {m['cpu_count']} cores, torch {m['torch']}."]
    return "\n".join(lines) + "\n"


def _setting(params: dict) -> str:
    return ",".join(f"{k}={params[k]}" for k in sorted(params)) or "-"


def _cells(result: dict, variant: str, **match) -> list[dict]:
    return [s for s in result["summary"] if s["variant"] == variant and s["n"]
            and all(s["params"].get(k) == v for k, v in match.items())]


def _errorbar(ax, xs, rows, label, **kw) -> None:
    ax.errorbar(xs, [100 * r["test_acc_mean"] for r in rows], yerr=[100 * (r["test_acc_std"] or 0) for r in rows],
                marker="o", capsize=3, label=label, **kw)


def _noise_panel(ax, result: dict) -> None:
    for v in result["config"]["variants"]:
        rows = sorted(_cells(result, v), key=lambda r: r["params"].get("noise", 0))
        _errorbar(ax, [100 * r["params"].get("noise", 0) for r in rows], rows, v)
    ax.set_xlabel("training-label noise, %")
    ax.set_ylabel("test accuracy, % (mean ± std)")


def _lam_panels(axes, result: dict) -> None:
    cfg = result["config"]
    for ax, noise in zip(axes, cfg["axes"].get("noise", [None])):
        match = {} if noise is None else {"noise": noise}
        for base in (v for v in cfg["variants"] if "rw" not in v):
            for r in _cells(result, base, **match):
                lo, hi = 100 * (r["test_acc_mean"] - (r["test_acc_std"] or 0)), 100 * (r["test_acc_mean"] + (r["test_acc_std"] or 0))
                ax.axhspan(lo, hi, color="gray", alpha=0.25)
                ax.axhline(100 * r["test_acc_mean"], color="gray", label=f"{base} (mean ± std)")
        for norm in cfg["axes"].get("normalization", [result["task"]["normalization"]]):
            rows = sorted((r for v in cfg["variants"] if "rw" in v for r in _cells(result, v, **match)
                           if r["params"].get("normalization", result["task"]["normalization"]) == norm),
                          key=lambda r: r["params"]["lam"])
            _errorbar(ax, [r["params"]["lam"] for r in rows], rows, f"RW-SAM, {norm}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("lam")
        ax.set_ylabel("test accuracy, %")
        ax.set_title("" if noise is None else f"{int(100 * noise)}% label noise", fontsize=9)


def _m_panels(axes, result: dict) -> None:
    cfg = result["config"]
    for ax, noise in zip(axes, cfg["axes"].get("noise", [None])):
        match = {} if noise is None else {"noise": noise}
        rows = sorted(_cells(result, "m-sam", **match), key=lambda r: r["m"])
        _errorbar(ax, [r["m"] for r in rows], rows, "m-SAM accuracy")
        for r in _cells(result, "sgd", **match):
            ax.axhline(100 * r["test_acc_mean"], color="gray", ls="--", label="SGD accuracy")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("m (samples per ascent)")
        ax.set_ylabel("test accuracy, %")
        twin = ax.twinx()
        twin.plot([r["m"] for r in rows], [r["cost_ratio_vs_sgd"] for r in rows], "s:", color="tab:red", label="cost × SGD")
        twin.set_ylabel("CPU time per epoch, × SGD (shared machine)", color="tab:red", fontsize=8)
        ax.set_title("" if noise is None else f"{int(100 * noise)}% label noise", fontsize=9)
        twin.legend(fontsize=7, loc="lower left")


def _estimator_panels(axes, result: dict) -> None:
    cfg = result["config"]
    names = cfg["axes"]["estimator"]
    for k, noise in enumerate(cfg["axes"].get("noise", [None])):
        match = {} if noise is None else {"noise": noise}
        rows = [next(iter(_cells(result, "rwsam-local", estimator=e, **match)), None) for e in names]
        xs = [i + 0.35 * (k - 0.5) for i in range(len(names))]
        tag = "" if noise is None else f" ({int(100 * noise)}% noise)"
        axes[0].bar(xs, [100 * r["test_acc_mean"] if r else 0 for r in rows], 0.35,
                    yerr=[100 * (r["test_acc_std"] or 0) if r else 0 for r in rows], capsize=3, label="RW-SAM" + tag)
        for r in _cells(result, "sam-local", **match):
            axes[0].axhline(100 * r["test_acc_mean"], ls="--", color=f"C{k}", lw=1, label="SAM-local" + tag)
        axes[1].bar(xs, [r.get("est_median_rel_error_mean") or 0 if r else 0 for r in rows], 0.35, label="median rel. error" + tag)
        axes[1].plot(xs, [r.get("est_spearman_mean") or 0 if r else 0 for r in rows], "k^", label="Spearman" if k == 0 else None)
    lows = [100 * s["test_acc_mean"] for s in result["summary"] if s["n"]]
    axes[0].set_ylim(max(0, min(lows) - 5), min(100, max(lows) + 3))
    for ax, label in zip(axes, ("test accuracy, %", "vs exact per-sample norms")):
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names)
        ax.set_ylabel(label)


def _short(params: dict) -> str:
    return ", ".join(f"{int(100 * v)}% noise" if k == "noise" else str(v) if k in ("normalization", "estimator")
                     else f"{k} {v}" for k, v in params.items()) or "-"


def _paired_panel(ax, result: dict) -> None:
    ds = [d for d in result["paired"] if d["diff_mean"] is not None]
    labels = [_short(d["params"]) for d in ds]
    ax.errorbar([100 * d["diff_mean"] for d in ds], range(len(ds)), xerr=[100 * (d["diff_se"] or 0) for d in ds],
                fmt="o", capsize=3)
    ax.axvline(0, color="gray", lw=0.8)
    ax.set_yticks(range(len(ds)))
    ax.set_yticklabels(labels, fontsize=7)
    pair = f"{ds[0]['variant']} − {ds[0]['baseline']}" if ds else "paired difference"
    ax.set_xlabel(f"{pair}, points (mean ± SE, {ds[0]['n'] if ds else 0} seeds)", fontsize=8)


def grid_figure(result: dict, path: str) -> None:
    """The grid's figure (module docstring), saved to ``path``."""
    plt = _pyplot()
    axes_cfg = result["config"]["axes"]
    noise_panels = max(1, len(axes_cfg.get("noise", [None]))) if ("lam" in axes_cfg or "m" in axes_cfg) else 1
    n_main = 2 if "estimator" in axes_cfg else noise_panels
    extra = 1 if result["paired"] else 0
    height = max(4.2, 0.2 * len(result["paired"]) + 1.2)
    fig, axes = plt.subplots(1, n_main + extra, figsize=(5.2 * (n_main + extra), height), squeeze=False)
    main_axes = list(axes[0][:n_main])
    if "lam" in axes_cfg:
        _lam_panels(main_axes, result)
    elif "m" in axes_cfg:
        _m_panels(main_axes, result)
    elif "estimator" in axes_cfg:
        _estimator_panels(main_axes, result)
    else:
        _noise_panel(main_axes[0], result)
    for ax in main_axes:
        ax.legend(fontsize=7)
    if extra:
        _paired_panel(axes[0][-1], result)
    fig.suptitle("\n".join(textwrap.wrap(f"{result['name']}: {result['config']['description']}",
                                        int(17 * 5.2 * (n_main + extra)))), fontsize=9)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    """Rewrite the markdown and figure of a study grid's JSON."""
    return redraw(argv, "benchmarks.study.plots", grid_markdown, grid_figure)


if __name__ == "__main__":
    sys.exit(main())
