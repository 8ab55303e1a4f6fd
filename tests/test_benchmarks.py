"""The benchmark harness in quick mode: it runs, its JSON has the documented fields, and the
communication facts hold (local variants all-reduce SGD's bytes, global twice). No timing is
asserted anywhere: timings belong to the benchmark runs, not to tests.
"""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest

from benchmarks import bench_ddp, config, floor, gpu_check, harness, report, run, study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "benchmarks", "configs", "quick.yaml")
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
    # other scripts and users import the sweep's names from ``benchmarks.run``, where they all used to live
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
    assert floor.main(["--config", os.path.join(ROOT, "benchmarks", "configs", "msam_floor_quick.yaml"), "--out", str(tmp_path)]) == 0
    with open(tmp_path / "msam_floor_quick.json") as fh:
        result = json.load(fh)
    assert result["schema"] == floor.SCHEMA and result["finite"] is True and result["target"] == 1.15
    b = result["config"]["batch_size"]
    assert [(r["mode"], r["m"]) for r in result["records"]] == [(mode, b // k) for mode in floor.MODES for k in (1, 2, 4)]
    for r in result["records"]:
        k = r["k"]
        if r["mode"] != "compiled":  # counted by a hook on the eager module
            assert r["forwards_per_floor"] == 2 * k, "the floor: 2 b/m passes at batch m"
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
