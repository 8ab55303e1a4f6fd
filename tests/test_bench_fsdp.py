"""The FSDP2 benchmark preset runs end to end in its quick form and writes what it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_fsdp_benchmark_writes_json_and_plot(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.throughput.fsdp", "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "fsdp_quick.json").read_text())
    assert (tmp_path / "fsdp_quick.png").stat().st_size > 1000
    rows = result["variants"]
    assert set(rows) == {"fsdp-sgd", "fsdp-sam-local", "fsdp-sam-lean", "fsdp-sam-global", "ddp-sgd", "ddp-sam-local"}
    # Counted, not assumed: local SAM all-gathers once per unit, plain FSDP2 twice, lean three times.
    units = rows["fsdp-sgd"]["calls"]["reduce_scatter"]
    assert rows["fsdp-sam-local"]["calls"]["all_gather"] == units
    assert rows["fsdp-sgd"]["calls"]["all_gather"] == 2 * units
    assert rows["fsdp-sam-lean"]["calls"]["all_gather"] == 3 * units
    assert rows["fsdp-sam-global"]["calls"]["reduce_scatter"] == 2 * units
    assert rows["ddp-sam-local"]["bytes"]["all_reduce"] == rows["ddp-sgd"]["bytes"]["all_reduce"]
    assert result["checks"]["sam_local_bytes_ok"] is True
    assert all(r["step_s"] > 0 for r in rows.values())


@pytest.mark.slow
def test_gpu_check_fsdp_section_dry_run_on_cpu(tmp_path):
    """The GPU check's FSDP2 section runs the same code on CPU (gloo): bf16 parameters with float32
    BatchNorm units, and lean gives the resident mode's weights (same arithmetic)."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu.fsdp", "--dry-run", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "fsdp_gpu_check.json").read_text())
    assert result["ok"] and result["lean_vs_resident_max_rel_diff"] < 1e-6
    for mode in ("resident", "lean"):
        assert result["modes"][mode]["finite"] and result["modes"][mode]["moved"]
