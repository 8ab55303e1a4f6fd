"""The named grids under the tuning protocol (``python -m benchmarks.study --grid NAME --tuned``)."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from benchmarks import study
from benchmarks.study.cost_select import setting_key

# A grid small enough to tune in seconds: 3 seeds, the whole tuning grid on 2, one extension per edge.
GRID = """
quick: {seeds: 3, train_size: 100, epochs: 1, batch_size: 32, width: 8}
tuning: {rho: [0.05, 0.2], lam: [0.5, 2.0]}
grids:
  g:
    variants: [sgd, sam-local, rwsam-local]
    axes: {noise: [0.4]}
    pairs: [[rwsam-local, sam-local]]
    seeds: 3
    tuned: {tune_seeds: 2, extend: 1}
"""
START = {"rho": (0.05, 0.2), "lam": (0.5, 2.0)}


def _run(out, text: str = GRID, *extra: str) -> int:
    (out / "grids.yaml").write_text(text)
    return study.main(["--grid", "g", "--tuned", "--quick", "--grid-config", str(out / "grids.yaml"), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned")
    assert _run(out) == 0
    with open(out / "study_g_quick_tuned.json") as fh:
        return out, json.load(fh)


def _cell_runs(result, variant):
    return [r for r in result["runs"] if r["variant"] == variant]


def test_tuned_selects_by_validation_over_the_tried_grid(tuned):
    _, result = tuned
    assert result["schema"] == "dist-sam-study-tuned/1" and result["complete"]
    assert result["tuned"] == {"sgd": [], "sam-local": ["rho"], "rwsam-local": ["rho", "lam"]}
    assert {s["variant"] for s in result["selected"]} == {"sgd", "sam-local", "rwsam-local"}
    for sel in result["selected"]:
        runs = _cell_runs(result, sel["variant"])
        assert all(r["val_acc"] is not None and r["finite"] for r in runs)
        tune = [r for r in runs if r["seed"] < 2]
        tried = sorted({setting_key(r["params"]) for r in tune})
        # every tried setting ran on both tuning seeds, once
        assert sorted(setting_key(r["params"]) for r in tune) == sorted(tried * 2)
        keys = result["tuned"][sel["variant"]]
        grid = sorted({tuple(r["params"][k] for k in keys): r["params"] for r in tune}.items())
        val = {setting_key(p): statistics.mean(r["val_acc"] for r in tune if r["params"] == p) for _, p in grid}
        best = max((setting_key(p) for _, p in grid), key=lambda k: val[k])  # the first of equal values
        assert sel["setting"] == best
        # the remaining seed ran the selected setting only, and test accuracy is reported there
        assert [setting_key(r["params"]) for r in runs if r["seed"] >= 2] == [best]
        chosen = sorted((r for r in runs if setting_key(r["params"]) == best), key=lambda r: r["seed"])
        assert sel["seeds"] == [0, 1, 2] and sel["test_acc"] == [r["test_acc"] for r in chosen]


def test_tuned_extends_an_edge_and_marks_what_stays_on_one(tuned):
    _, result = tuned
    for sel in result["selected"]:
        keys = result["tuned"][sel["variant"]]
        tune = [r for r in _cell_runs(result, sel["variant"]) if r["seed"] < 2]
        # the first round is the start grid; its best by validation decides which edges grow
        start = [r for r in tune if all(r["params"][k] in START[k] for k in keys)]
        order = sorted({tuple(r["params"][k] for k in keys) for r in start})
        val = {p: statistics.mean(r["val_acc"] for r in start if tuple(r["params"][k] for k in keys) == p) for p in order}
        first = dict(zip(keys, max(order, key=lambda p: val[p]))) if keys else {}
        for key in keys:
            tried = sorted({r["params"][key] for r in tune})
            lo, hi = min(START[key]), max(START[key])
            # the start grid plus at most one value beyond each edge (extend: 1), halved or doubled
            assert set(START[key]) <= set(tried) <= {lo / 2, *START[key], hi * 2}, (sel["variant"], key, tried)
            if first[key] == lo:
                assert lo / 2 in tried
            if first[key] == hi:
                assert hi * 2 in tried
            value = sel["params"][key]
            if value in (min(tried), max(tried)):  # on an edge after growing: only an extended value, marked
                assert value in (lo / 2, hi * 2) and key in sel["at_grid_edge"]
            else:
                assert key not in sel["at_grid_edge"]


def test_tuned_pairs_by_seed_at_each_selected_setting(tuned):
    _, result = tuned
    sel = {s["variant"]: s for s in result["selected"]}
    pairs = {(d["variant"], d["baseline_variant"]): d for d in result["paired"]}
    assert set(pairs) == {("rwsam-local", "sam-local"), ("sgd", "sam-local")}
    for (variant, base), d in pairs.items():
        a, b = dict(zip(sel[variant]["seeds"], sel[variant]["test_acc"])), dict(zip(sel[base]["seeds"], sel[base]["test_acc"]))
        diffs = [a[s] - b[s] for s in sorted(a)]
        assert d["diffs"] == pytest.approx(diffs, abs=1e-12) and d["wins"] == sum(x > 0 for x in diffs)
        assert d["diff_se"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(3), abs=1e-12)


def test_tuned_validation_is_held_out_of_the_test_set(tuned):
    from benchmarks.study.cost_run import load_split

    _, result = tuned
    task = result["task"]
    data = load_split(task["train_size"], result["tuning"]["val_size"], 0.4, task["noise_seed"])
    ids = [set(map(int, data[k])) for k in ("train_ids", "val_ids", "test_ids")]
    assert len(ids[1]) == result["tuning"]["val_size"] and not (ids[0] & ids[1] or ids[1] & ids[2] or ids[0] & ids[2])


def test_tuned_resume_reruns_only_the_missing_runs(tuned, tmp_path):
    out, result = tuned
    cut = dict(result, runs=[r for r in result["runs"] if not (r["variant"] == "sam-local" and r["seed"] == 2)])
    (tmp_path / "study_g_quick_tuned.json").write_text(json.dumps(cut))
    assert _run(tmp_path, GRID, "--resume") == 0
    again = json.loads((tmp_path / "study_g_quick_tuned.json").read_text())
    key = lambda r: (r["variant"], setting_key(r["params"]), r["seed"])  # noqa: E731
    assert sorted(map(key, again["runs"])) == sorted(map(key, result["runs"]))
    kept = {key(r): r["train_cpu_s"] for r in cut["runs"]}
    assert all(r["train_cpu_s"] == kept[key(r)] for r in again["runs"] if key(r) in kept)  # not rerun
    redone = [r for r in again["runs"] if key(r) not in kept]
    old = {key(r): r["test_acc"] for r in result["runs"]}
    assert redone and all(r["test_acc"] == old[key(r)] for r in redone)  # the same seed trains the same model


def test_tuned_bad_settings_are_refused(tmp_path):
    from benchmarks.study.tuned import load_tuning

    for text, message in [(GRID.replace("rho: [0.05, 0.2]", "rho: [0.05, -1]"), r"tuning.rho: a non-empty list of positive"),
                          (GRID.replace("extend: 1", "bogus: 1"), r"unknown keys \['bogus'\]"),
                          (GRID.replace("tune_seeds: 2", "tune_seeds: 4"), r"tune_seeds 4 > seeds 3")]:
        (tmp_path / "grids.yaml").write_text(text)
        with pytest.raises(ValueError, match=message):
            load_tuning("g", str(tmp_path / "grids.yaml"), quick=True)
        assert _run(tmp_path, text) == 2
