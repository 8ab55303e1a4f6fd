"""The benchmark harness in quick mode: it runs, its JSON has the documented fields, and the
communication facts hold (local variants all-reduce SGD's bytes, global twice). No timing is
asserted anywhere: timings belong to the benchmark runs, not to tests.
"""

from __future__ import annotations

import json
import math
import os
import subprocess

import numpy as np
import pytest
import torch

from benchmarks import study
from benchmarks.gpu import check as gpu_check
from benchmarks.throughput import config, floor, harness, report, run
from benchmarks.throughput import ddp as bench_ddp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "benchmarks", "throughput", "configs", "quick.yaml")
RECORD_FIELDS = {
    "variant", "world_size", "optimizer", "ascent", "m", "micro_batch_size", "batch_per_worker", "global_batch",
    "step_time_s", "img_per_s", "allreduce_calls_per_step", "allreduce_bytes_per_step", "peak_memory_mb", "finite",
    "step_time_ratio_vs_sgd", "allreduce_bytes_ratio_vs_sgd",
}


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert run.main(["--config", QUICK, "--out", str(out)]) == 0
    with open(out / "quick.json") as fh:
        return out, json.load(fh)


@pytest.mark.slow
def test_sweep_quick_writes_documented_fields(sweep):
    out, result = sweep
    assert result["schema"] == report.SCHEMA and result["name"] == "quick"
    for key in ("device", "torch", "threads_per_process", "cpu_count", "load_average"):
        assert key in result["machine"]
    assert result["config"]["world_sizes"] == [1, 2] and result["config"]["quick"] is True
    assert result["skipped"] == {}, "every variant of the config ran (RW-SAM included)"
    names = list(config.DEFAULT_VARIANTS)
    for n in (1, 2):
        at = [r for r in result["records"] if r["world_size"] == n]
        assert [r["variant"] for r in at] == names
        for r in at:
            assert RECORD_FIELDS <= set(r), RECORD_FIELDS - set(r)
            assert {"median", "p10", "p90", "min", "n"} <= set(r["step_time_s"])
            assert r["step_time_s"]["n"] >= result["config"]["steps"]
            assert all(_number(v) for v in (r["img_per_s"], r["step_time_ratio_vs_sgd"], r["peak_memory_mb"]))
            assert r["finite"] is True
    msam = {r["variant"]: r["m"] for r in result["records"] if r["world_size"] == 2 and r["variant"].startswith("msam")}
    assert msam == {"msam-b": 8, "msam-b/2": 4, "msam-b/4": 2, "msam-b/8": 1}
    assert [s["variant"] for s in result["scaling"]] == names and all(_number(s["efficiency"]) for s in result["scaling"])
    for suffix in (".md", "_throughput_vs_m.png", "_step_time.png", "_scaling.png"):
        assert (out / f"quick{suffix}").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2])
def test_sweep_communication_facts(sweep, world_size):
    at = {r["variant"]: r for r in sweep[1]["records"] if r["world_size"] == world_size}
    sgd = at["sgd"]
    assert sgd["allreduce_calls_per_step"] >= 1 and sgd["allreduce_bytes_per_step"] > 0
    for name, r in at.items():
        factor = 2 if name == "sam-global" else 1  # local, micro (m-SAM), USAM, ASAM, RW-SAM: as SGD
        assert r["allreduce_bytes_per_step"] == factor * sgd["allreduce_bytes_per_step"], name
        assert r["allreduce_calls_per_step"] == factor * sgd["allreduce_calls_per_step"], name
    comm = [c for c in sweep[1]["checks"] if c["world_size"] == world_size and c["check"].startswith("all-reduce")]
    assert len(comm) == len(at) - 1 and all(c["ok"] for c in comm)


@pytest.mark.slow
def test_bench_ddp_ratios_from_a_sweep(sweep):
    ratios = bench_ddp.ddp_ratios(sweep[1])
    assert {"sam-local/sgd", "sam-global/sgd", "local_target", "local_ok"} <= set(ratios)
    assert ratios["sam-local/sgd bytes"] == 1 and ratios["sam-global/sgd bytes"] == 2


@pytest.mark.slow
def test_compiled_twin_runs_beside_eager_in_one_run():
    """``<variant>+compiled`` steps a torch.compile'd twin of the model in the same interleaved
    rounds (DDP, its own counter): compiled/eager comes from one run, communication as SGD's."""
    cfg = config.BenchConfig(name="twin", model="small_cnn", image_size=16, batch_size=8, world_sizes=(1,), threads=1,
                             variants=("sgd", "sam-local", "sam-local+compiled", "msam-b/2+compiled"), warmup=1, steps=2,
                             steps_per_round=1, quick=True, compile_backend="eager", timeout_s=300)
    records = {r["variant"]: r for r in report.summarize(cfg, 1, harness.run_world(cfg, 1))}
    assert list(records) == list(cfg.variants)
    assert _number(records["sam-local+compiled"]["compiled_vs_eager"])
    assert _number(records["sam-local+compiled"]["compiled_vs_eager_paired"])
    assert "compiled_vs_eager" not in records["msam-b/2+compiled"]  # no eager msam-b/2 in this run
    sgd = records["sgd"]
    for name in ("sam-local+compiled", "msam-b/2+compiled"):
        r = records[name]
        assert r["finite"] is True and r["step_time_s"]["n"] == 2
        assert (r["allreduce_calls_per_step"], r["allreduce_bytes_per_step"]) == (sgd["allreduce_calls_per_step"], sgd["allreduce_bytes_per_step"])
    assert config.parse_variant("msam-b/2+compiled", 8, 1, cfg).micro_batch_size == 4
    with pytest.raises(ValueError, match="compile: true"):
        config.BenchConfig(variants=("sgd", "sam-local+compiled"), compile=True)


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="steps"):
        config.BenchConfig(steps=5)
    with pytest.raises(ValueError, match="sgd"):
        config.BenchConfig(variants=("sam-local",))
    with pytest.raises(ValueError, match="msam-b/3"):
        config.BenchConfig(batch_size=32, variants=("sgd", "msam-b/3"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbogus: 1\n")
    with pytest.raises(ValueError, match="unknown keys"):
        config.load_config(str(bad))
    v = config.parse_variant("sam-global", 16, 4, config.BenchConfig())
    assert (v.ascent, v.m) == ("global", 64)


def test_run_keeps_its_public_names():
    # other scripts and users import the sweep's names from ``benchmarks.throughput.run``, where they all live
    for name in run.__all__:
        assert hasattr(run, name), name
    assert run.BenchConfig is config.BenchConfig is harness.BenchConfig and run.summarize is report.summarize
    assert run.measure is harness.measure and run.SCHEMA == report.SCHEMA


@pytest.mark.slow
def test_study_quick(tmp_path):
    assert study.main(["--quick", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "study_quick.json") as fh:
        result = json.load(fh)
    assert result["schema"] == study.SCHEMA and result["config"]["quick"] is True
    names = list(study.VARIANTS)
    assert [v["name"] for v in result["variants"]] == names
    assert all({"optimizer", "ascent", "m", "mapping", "epochs"} <= set(v) for v in result["variants"])
    seeds, noise = result["config"]["seeds"], result["config"]["noise"]
    assert noise == [0.0, 0.4] and len(result["runs"]) == len(names) * len(noise) * seeds
    for s in result["summary"]:
        assert s["n"] == seeds and 0.0 <= s["test_acc_mean"] <= 1.0 and s["test_acc_std"] >= 0.0
        assert _number(s["sgn_trace_mean"]) and s["sgn_trace_mean"] > 0
    assert all(r["finite"] for r in result["runs"])
    assert (tmp_path / "study_quick.md").stat().st_size > 0 and (tmp_path / "study_quick.png").stat().st_size > 0


def test_study_data_matches_the_demo_split():
    from dist_sam.data.demo import flip_labels

    data = study.load_digits_split(0.4, noise_seed=0)
    assert data["x_train"].shape == (1437, 3, 8, 8) and data["x_test"].shape == (360, 3, 8, 8)
    flipped = (data["y_train"] != data["y_train_clean"]).float().mean().item()
    assert flipped == pytest.approx(0.4, abs=1e-3)
    assert data["y_train"].tolist() == flip_labels(data["y_train_clean"].numpy(), 0.4, 0).tolist()


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], check=True)


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    from dist_sam.data import dali

    args = ["--dry-run", "--out", str(tmp_path)] + ([] if dali.dali_available() else ["--skip-dali"])
    assert gpu_check.main(args) == 0
    with open(tmp_path / "gpu_check.json") as fh:
        result = json.load(fh)
    assert result["schema"] == gpu_check.SCHEMA and result["dry_run"] is True
    assert result["errors"] == {} and result["skipped"] == {}, (result["errors"], result["skipped"])
    ran = [s.name for s in gpu_check.SECTIONS if dali.dali_available() or not s.dali]
    assert list(result["seconds"]) == ran, "every section ran, in order, and wrote its time"
    assert result["correctness"]["ok"] is True and set(result["correctness"]) >= set(gpu_check.VARIANTS)
    assert set(result["throughput_eager"]["variants"]) == set(gpu_check.VARIANTS)
    assert {"sam-local/sgd", "rwsam-fd/sam-local", "rwsam-last_layer/sam-local", "msam-b/4-vmap/msam-b/4"} <= set(result["throughput_eager"]["ratios"])
    assert result["throughput_compiled"]["config"]["compile"] is True
    # the cheaper steps against SAM-local, at the GPU's batch over m (DRY: b = 8, m = 2, so b/4)
    assert result["looksam"]["ok"] and {"looksam-k5/sam-local", "looksam-off/sgd"} <= set(result["looksam"]["ratios"])
    assert result["look_msam"]["ok"] and set(result["look_msam"]["variants"]) == {"sgd", "sam-local", "looksam-b/4-k5"}
    assert result["msam_vmap"]["ok"] and "vmap/sequential" in result["msam_vmap"]["ratios"]
    assert result["looksam"]["config"]["batch_size"] == gpu_check.DRY["sam_batch"]
    assert set(result["throughput_compiled_rwsam"]["variants"]) == {"sgd", "rwsam-fd", "rwsam-last_layer"}
    fp16 = result["fp16_scaler"]
    assert fp16["ok"] and fp16["inf_step_skipped"] and fp16["scale_after_inf"] < fp16["scale_before_inf"]
    trainer = result["ddp_dali_trainer"]
    assert trainer["ok"] and trainer["wrapped"] == "DistributedDataParallel" and trainer["epochs_completed"] == 2
    assert trainer["comm_per_step"]["allreduce_calls_per_step"] >= 1, "the DDP trainer all-reduced at world size 1"
    if dali.dali_available():
        assert trainer["data_backend"] == "dali"
        assert result["dali"]["images"] > 0 and _number(result["dali"]["img_per_s"])


def test_gpu_check_budget_skips_sections(tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--budget-s", "0", "--only", "correctness,fp16_scaler"]) == 0
    with open(tmp_path / "gpu_check.json") as fh:
        result = json.load(fh)
    assert set(result["skipped"]) == {"correctness", "fp16_scaler"} and "correctness" not in result
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--only", "nonsense"]) == 2


@pytest.mark.slow
def test_msam_floor_quick(tmp_path):
    assert floor.main(["--config", os.path.join(ROOT, "benchmarks", "throughput", "configs", "msam_floor_quick.yaml"), "--out", str(tmp_path)]) == 0
    with open(tmp_path / "msam_floor_quick.json") as fh:
        result = json.load(fh)
    assert result["schema"] == floor.SCHEMA and result["finite"] is True and result["target"] == 1.15
    b = result["config"]["batch_size"]
    assert [(r["mode"], r["m"]) for r in result["records"]] == [(mode, b // k) for mode in floor.MODES for k in (1, 2, 4)]
    for r in result["records"]:
        k = r["k"]
        if r["mode"] != "compiled":  # counted by a hook on the eager module
            assert r["forwards_per_floor"] == 2 * k, "the floor: 2 b/m passes at batch m"
            assert r["forwards_per_sgd"] == 1, "SGD: one pass at batch b"
        # the sequential step runs as many forwards as its floor; the batched one runs two vmapped ones
        assert r["forwards_per_step"] == {"eager": 2 * k, "vmap": 2, "compiled": None}[r["mode"]]
        assert r["floor_of"] == ("eager" if r["mode"] == "vmap" else r["mode"])
        assert all(_number(r[key]) for key in ("ratio_to_floor", "ratio_to_floor_paired", "step_ratio_vs_sgd", "floor_ratio_vs_sgd"))
        assert r["step_s"]["n"] == result["config"]["steps"] and isinstance(r["within_target"], bool)
    for suffix in (".md", ".png"):
        assert (tmp_path / f"msam_floor_quick{suffix}").stat().st_size > 0


def test_floor_config_and_vmap_variant_validation():
    with pytest.raises(ValueError, match="divisors"):
        floor.FloorConfig(batch_size=32, divisors=(3,))
    with pytest.raises(ValueError, match="modes"):
        floor.FloorConfig(modes=("eager", "jit"))
    with pytest.raises(ValueError, match="steps"):
        floor.FloorConfig(steps=5)
    v = config.parse_variant("msam-b/4-vmap", 32, 1, config.BenchConfig())
    assert (v.ascent, v.micro_batch_size, v.micro_impl, v.name) == ("micro", 8, "vmap", "msam-b/4-vmap")
    assert config.parse_variant("msam-b/4", 32, 1, config.BenchConfig()).micro_impl == "loop"


# -- the study's named grids (benchmarks/study/grid.py) -----------------------------------------
def _grid_quick(tmp_path, name: str, yaml_text: str | None = None) -> dict:
    args = ["--grid", name, "--quick", "--out", str(tmp_path)]
    if yaml_text is not None:
        (tmp_path / "grids.yaml").write_text(yaml_text)
        args += ["--grid-config", str(tmp_path / "grids.yaml")]
    assert study.main(args) == 0
    with open(tmp_path / f"study_{name}_quick.json") as fh:
        return json.load(fh)


def _check_paired(result: dict) -> None:
    """The paired differences, recomputed from the per-seed runs (same seed, same baseline settings)."""
    from benchmarks.study.task import AXIS_USERS

    assert result["paired"]
    for d in result["paired"]:
        def acc(variant, params):
            return {r["seed"]: r["test_acc"] for r in result["runs"]
                    if r["variant"] == variant and r["params"] == params}
        rw = acc(d["variant"], d["params"])
        base = acc(d["baseline"], {k: v for k, v in d["params"].items() if d["baseline"] in AXIS_USERS[k]})
        diffs = [rw[s] - base[s] for s in sorted(rw)]
        assert d["seeds"] == sorted(rw) == sorted(base) and d["diffs"] == pytest.approx(diffs, abs=1e-12)
        assert d["diff_mean"] == pytest.approx(float(np.mean(diffs)), abs=1e-12)
        assert d["diff_se"] == pytest.approx(float(np.std(diffs, ddof=1)) / math.sqrt(len(diffs)), abs=1e-12)
        assert d["wins"] == sum(x > 0 for x in diffs)


@pytest.mark.parametrize("name", ["noise", "lam", "estimator", "m", "asam"])
def test_study_grid_quick(tmp_path, name):
    from benchmarks.study.grid import cells, load_grid
    from benchmarks.study.task import AXIS_USERS

    result = _grid_quick(tmp_path, name)
    grid = load_grid(name, quick=True)
    assert result["schema"] == "dist-sam-study-grid/1" and result["complete"] and result["config"]["quick"] is True
    assert len(result["runs"]) == len(cells(grid)) * grid.seeds and all(r["finite"] for r in result["runs"])
    for r in result["runs"]:  # each run carries exactly the axes that change its variant
        assert set(r["params"]) == {k for k in grid.axes if r["variant"] in AXIS_USERS[k]}
    assert [s["n"] for s in result["summary"]] == [grid.seeds] * len(cells(grid))
    if grid.pairs:
        _check_paired(result)
    assert (tmp_path / f"study_{name}_quick.md").stat().st_size > 0 and (tmp_path / f"study_{name}_quick.png").stat().st_size > 0
    b = grid.task["batch_size"] // 4
    if name == "m":  # m = b/k, and the cost ratio is against the same run's SGD
        assert sorted({r["m"] for r in result["runs"] if r["variant"] == "m-sam"}) == [b // 8, b]
        sgd = np.mean([r["cpu_s_per_epoch"] for r in result["runs"] if r["variant"] == "sgd"])
        for s in (s for s in result["summary"] if s["variant"] == "m-sam"):
            cost = np.mean([r["cpu_s_per_epoch"] for r in result["runs"] if r["variant"] == "m-sam" and r["m"] == s["m"]])
            assert s["cost_ratio_vs_sgd"] == pytest.approx(cost / sgd)
    if name == "estimator":  # the probe compares the estimate with exact norms of the same samples
        by = {s["params"].get("estimator"): s for s in result["summary"] if s["variant"] == "rwsam-local"}
        assert by["exact"]["est_median_rel_error_mean"] < 1e-5 and by["exact"]["est_spearman_mean"] > 0.999
        assert by["fd"]["est_median_rel_error_mean"] > 1e-3 and by["last_layer"]["est_median_rel_error_mean"] > 1e-3


def test_study_grid_pairs_by_seed(tmp_path):
    # lam = 0 is SAM bit for bit, so with the same seed (data, init, order, shifts) the difference is exactly 0
    text = ("grids:\n  g:\n    variants: [sam-local, rwsam-local]\n    axes: {lam: [0.0, 2.0]}\n"
            "    pairs: [[rwsam-local, sam-local]]\n"
            "quick: {seeds: 2, train_size: 60, epochs: 2, batch_size: 16, width: 4, noise: 0.4}\n")
    result = _grid_quick(tmp_path, "g", text)
    _check_paired(result)
    at0 = next(d for d in result["paired"] if d["params"] == {"lam": 0.0})
    assert at0["diffs"] == [0.0, 0.0] and at0["ties"] == 2
    rw = [r for r in result["runs"] if r["variant"] == "rwsam-local" and r["params"] == {"lam": 0.0}]
    sam = [r for r in result["runs"] if r["variant"] == "sam-local"]
    assert [r["train_acc"] for r in rw] == [r["train_acc"] for r in sam]
    assert len({r["test_acc"] for r in sam}) == 2  # the seeds differ


def test_study_grid_validation(tmp_path):
    from benchmarks.study.grid import GridConfig, load_grid

    with pytest.raises(ValueError, match=r"unknown grid 'bogus'; accepted: \['asam', 'estimator', 'lam', 'm', 'noise'\]"):
        load_grid("bogus")
    assert study.main(["--grid", "bogus", "--out", str(tmp_path)]) == 2
    with pytest.raises(ValueError, match="normalization.*'zcore'.*zscore"):
        GridConfig(name="x", variants=("rwsam-local",), axes={"normalization": ["zcore"]})
    with pytest.raises(ValueError, match="'b/3'"):
        GridConfig(name="x", variants=("m-sam",), axes={"m": ["b/3"]})
    with pytest.raises(ValueError, match="axis 'lam' needs"):
        GridConfig(name="x", variants=("sgd", "sam-local"), axes={"lam": [0.5]})
    with pytest.raises(ValueError, match="unknown task keys"):
        GridConfig(name="x", variants=("sgd",), task={"epoch": 3})
    with pytest.raises(ValueError, match="pair"):
        GridConfig(name="x", variants=("sgd",), pairs=[["rwsam-local", "sgd"]])
    bad = tmp_path / "bad.yaml"
    bad.write_text("grids:\n  g:\n    variants: [sgd]\n    bogus: 1\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_grid("g", str(bad))


def test_study_task_split_and_shifts():
    from benchmarks.study.task import _shift, load_task_data

    data = load_task_data(300, 0.4)
    assert data["x_train"].shape == (300, 3, 8, 8) and data["x_test"].shape == (1497, 3, 8, 8)
    assert torch.bincount(data["y_train_clean"], minlength=10).tolist() == [30] * 10
    assert (data["y_train"] != data["y_train_clean"]).float().mean().item() == pytest.approx(0.4)
    # train: from the demo's train split (i % 5 != 0); test: every other digit, the demo's validation included
    train, test = set(data["train_ids"].tolist()), set(data["test_ids"].tolist())
    assert not train & test and train | test == set(range(1797)) and all(i % 5 for i in train)
    from sklearn.datasets import load_digits

    digits = load_digits()
    assert data["y_test"].tolist() == digits.target[sorted(test)].tolist()
    assert data["y_train_clean"].tolist() == digits.target[sorted(train)].tolist()
    # the first 30 of each class in file order: no later image of a class is picked before an earlier one
    pool = [i for i in range(1797) if i % 5]
    for c in range(10):
        of_c = [i for i in pool if digits.target[i] == c]
        assert sorted(i for i in train if digits.target[i] == c) == of_c[:30]
    x = torch.randn(32, 3, 8, 8)
    out = _shift(x, torch.tensor(-9.0), torch.Generator().manual_seed(0))
    shifts = set()
    for i in range(32):
        pad = torch.nn.functional.pad(x[i], (1, 1, 1, 1), value=-9.0)
        match = [(dy, dx) for dy in range(3) for dx in range(3) if torch.equal(out[i], pad[:, dy:dy + 8, dx:dx + 8])]
        assert len(match) == 1
        shifts.add(match[0])
    assert len(shifts) > 4  # the shifts vary across samples
