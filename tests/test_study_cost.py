"""The cost grid (``python -m benchmarks.study --grid cost``) in its quick form, and its checks."""

from __future__ import annotations

import itertools
import json
import statistics

import pytest

from benchmarks import study
from benchmarks.study.cost import METHODS, CostConfig
from benchmarks.study.cost_select import setting_key


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("cost")
    assert study.main(["--grid", "cost", "--quick", "--out", str(out)]) == 0
    with open(out / "study_cost_quick.json") as fh:
        return out, json.load(fh)


def test_cost_quick_files_and_tuning_grid(quick):
    out, result = quick
    assert result["schema"] == "dist-sam-study-cost/1" and result["complete"] and result["config"]["quick"]
    assert (out / "study_cost_quick.md").stat().st_size > 0 and (out / "study_cost_quick.png").stat().st_size > 0
    cfg = result["config"]
    assert set(result["tuning_grid"]) == set(METHODS)
    for method, grid in result["tuning_grid"].items():
        keys = METHODS[method]["tune"]
        values = [cfg["look_rho"] if k == "rho" and METHODS[method]["opt"] == "looksam" else cfg[k] for k in keys]
        assert grid == [dict(zip(keys, v)) for v in itertools.product(*values)]
        for noise, params, seed in itertools.product(cfg["noise"], grid, range(cfg["seeds"])):
            assert sum(r["method"] == method and r["noise"] == noise and r["params"] == params and r["seed"] == seed
                       for r in result["runs"]) == 1, (method, noise, params, seed)


def test_cost_quick_selects_by_validation_not_test(quick):
    _, result = quick
    cfg = result["config"]
    assert len(result["selected"]) == len(METHODS) * len(cfg["noise"])
    for sel in result["selected"]:
        runs = [r for r in result["runs"] if r["method"] == sel["method"] and r["noise"] == sel["noise"]]
        by_setting = {}
        for r in runs:
            by_setting.setdefault(setting_key(r["params"]), []).append(r)
        order = [setting_key(p) for p in result["tuning_grid"][sel["method"]]]
        val = {k: statistics.mean(r["val_acc"] for r in by_setting[k]) for k in order}
        best = max(order, key=lambda k: val[k])  # first of equal values, as the grid's order gives
        assert sel["setting"] == best and sel["selected_by"] == "val_acc"
        chosen = sorted(by_setting[best], key=lambda r: r["seed"])
        assert sel["test_acc"] == [r["test_acc"] for r in chosen]
        assert sel["test_acc_mean"] == pytest.approx(statistics.mean(sel["test_acc"]))
        assert all(row["test_acc_mean"] is not None for row in sel["grid"])


def test_cost_quick_pairs_by_seed(quick):
    _, result = quick
    sel = {(s["method"], s["noise"]): s for s in result["selected"]}
    assert result["paired_vs_sam_local"]
    for d in result["paired_vs_sam_local"]:
        a, b = sel[(d["method"], d["noise"])], sel[("sam-local", d["noise"])]
        expected = [x - dict(zip(b["seeds"], b["test_acc"]))[s] for s, x in zip(a["seeds"], a["test_acc"])]
        assert d["diffs"] == pytest.approx(expected) and d["n"] == len(expected)


def test_cost_quick_counts_passes(quick):
    _, result = quick
    t = result["timing"]["methods"]
    cfg = result["config"]
    b_global, workers = cfg["task"]["batch_size"], 4
    assert t["sgd"]["ratio_vs_sgd"] == pytest.approx(1.0)
    assert (t["sgd"]["forward_per_step"], t["sgd"]["backward_per_step"], t["sgd"]["forward_calls_per_step"]) == (1.0, 1.0, 1.0)
    assert (t["sam-local"]["forward_per_step"], t["sam-local"]["backward_per_step"]) == (2.0, 2.0)
    assert t["sam-local"]["forward_calls_per_step"] == 2 * workers  # 4 simulated workers, ascent + descent each (loop twin)
    for k in (2, 4, 8):  # m = b/k: the same samples in k times more calls; vmap's counts come from its loop twin
        row = t[f"m-sam b/{k}"]
        assert (row["forward_per_step"], row["backward_per_step"]) == (2.0, 2.0)
        assert row["forward_calls_per_step"] == 2 * workers * k and row["passes_counted_on"] == f"m-sam b/{k} (loop)"
    for k in (2, 4):
        assert t[f"interval k={k}"]["forward_per_step"] == pytest.approx(1 + 1 / k)
    for family in ("looksam", "look-m-sam"):
        for k in (2, 5, 10):
            row = t[f"{family} k={k}"]
            assert row["forward_per_step"] == pytest.approx(1 + 1 / k) and row["backward_per_step"] == pytest.approx(1 + 1 / k)
            assert row["off_steps_per_cycle"] == k - 1 and row["off_step_ratio_vs_sgd"] > 0
    for k in (2, 4):  # first-order m-SAM: one forward per group of b/k; the penalty's double backward
        row = t[f"msam-fo b/{k}"]  # crosses the model's output twice (autograd.grad, then backward)
        assert (row["forward_per_step"], row["backward_per_step"]) == (1.0, 2.0)
        assert row["forward_calls_per_step"] == workers * k and row["passes_counted_on"] == f"msam-fo b/{k} (loop)"
    rw = t["rwsam fd"]
    assert rw["backward_per_step"] == 2.0 and rw["forward_per_step"] > 2.0  # fd's estimate costs forwards only
    assert b_global % workers == 0


def test_cost_quick_budget_table(quick):
    _, result = quick
    cost = {m: row["ratio_vs_sgd"] for m, row in result["timing"]["methods"].items()}
    rows = result["budget_table"]
    assert rows
    for noise in result["config"]["noise"]:
        mine = [r for r in rows if r["noise"] == noise]
        assert [r["budget"] for r in mine] == sorted(r["budget"] for r in mine)
        accs = [r["test_acc_mean"] for r in mine]
        assert accs == sorted(accs)  # a bigger budget never buys less
        for r in mine:
            assert cost[r["method"]] <= r["budget"]
            fits = [s for s in result["selected"] if s["noise"] == noise and cost.get(s["method"], 1e18) <= r["budget"]]
            assert r["test_acc_mean"] == max(s["test_acc_mean"] for s in fits)


def test_cost_config_validation(tmp_path):
    with pytest.raises(ValueError, match=r"unknown \['bogus'\]"):
        CostConfig(methods=("sgd", "bogus"))
    with pytest.raises(ValueError, match="'sgd' must be one of them"):
        CostConfig(methods=("sam-local",))
    with pytest.raises(ValueError, match="tune_seeds"):
        CostConfig(seeds=3, tune_seeds=4)
    with pytest.raises(ValueError, match="val_size"):
        CostConfig(val_size=55)
    with pytest.raises(ValueError, match="CostConfig.alpha"):
        CostConfig(alpha=())
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match=rf"CostConfig.extend must be an integer >= 0, got {bad!r}"):
            CostConfig(extend=bad)
    assert study.main(["--grid", "cost", "--phase", "bogus", "--out", str(tmp_path)]) == 2


def _fake_run(peak: dict):
    """A stand-in trainer whose validation accuracy peaks at ``peak`` (log-distance), test = val."""
    import math

    def run(task, spec, params, seed, val_size):
        acc = 0.9 - sum(abs(math.log(params[k] / v)) for k, v in peak.items() if k in params) / 10 + seed * 1e-4
        return dict(seed=seed, params=params, steps=1, m=None, train_cpu_s=0.0, val_acc=acc, test_acc=acc, finite=True,
                    passes_per_step=1.0)
    return run


def test_cost_grid_extends_an_edge_selection_and_stops_at_the_limit(tmp_path, monkeypatch):
    from benchmarks.study import cost

    # the optimum lies past the top of rho's grid (0.05, 0.1, 0.2): the edge grows to 0.4, then 0.8, then stops
    monkeypatch.setattr(cost, "train_cost_run", _fake_run({"rho": 1.6}))
    cfg = CostConfig(methods=("sgd", "sam-local", "looksam k=5"), noise=(0.4,), seeds=3, tune_seeds=2, extend=2,
                     alpha=(0.3, 0.7), look_rho=(0.05, 0.1))
    result = cost.run_cost(cfg, str(tmp_path), phase="accuracy", figures=False, log=lambda *_: None)
    sam = next(s for s in result["selected"] if s["method"] == "sam-local")
    assert sam["params"] == {"rho": 0.8} and sam["at_grid_edge"] == ["rho"]  # still on an edge: extend=2 was used up
    assert [p["rho"] for p in result["tuned_grid"]["sam-local"]["0.4"]] == [0.05, 0.1, 0.2, 0.4, 0.8]
    assert sam["seeds"] == [0, 1, 2]  # the chosen setting ran on the remaining seed too
    rhos = sorted({r["params"]["rho"] for r in result["runs"] if r["method"] == "sam-local"})
    assert rhos == [0.05, 0.1, 0.2, 0.4, 0.8]
    assert all(r["seed"] < 2 for r in result["runs"] if r["method"] == "sam-local" and r["params"]["rho"] != 0.8)
    # LookSAM: rho grows the same way (alpha, flat here, ties to its first value and grows downward)
    look = next(s for s in result["selected"] if s["method"] == "looksam k=5")
    assert look["params"]["rho"] == 0.4 and "rho" in look["at_grid_edge"]  # 0.1 -> 0.2 -> 0.4: two extensions


def test_cost_grid_extends_alpha_toward_one_and_an_inner_optimum_not_at_all(tmp_path, monkeypatch):
    from benchmarks.study import cost

    assert cost.extend_value("alpha", 0.7, low=False) == 0.85 and cost.extend_value("alpha", 0.3, low=True) == 0.15
    assert cost.extend_value("rho", 0.05, low=True) == 0.025 and cost.extend_value("rho", 0.2, low=False) == 0.4
    monkeypatch.setattr(cost, "train_cost_run", _fake_run({"rho": 0.1, "alpha": 0.95}))
    cfg = CostConfig(methods=("sgd", "sam-local", "looksam k=5"), noise=(0.0,), seeds=2, tune_seeds=2, extend=2,
                     look_rho=(0.05, 0.1, 0.2))
    result = cost.run_cost(cfg, str(tmp_path), phase="accuracy", figures=False, log=lambda *_: None)
    grids = result["tuned_grid"]
    assert grids["sam-local"]["0.0"] == [{"rho": r} for r in (0.05, 0.1, 0.2)]  # inside the grid: nothing added
    look = next(s for s in result["selected"] if s["method"] == "looksam k=5")
    assert look["params"] == {"rho": 0.1, "alpha": 0.925} and look["at_grid_edge"] == ["alpha"]
    assert sorted({p["alpha"] for p in grids["looksam k=5"]["0.0"]}) == [0.3, 0.7, 0.85, 0.925]
