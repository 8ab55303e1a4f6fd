"""`make demo`, short: writes the digits data, trains RW-SAM (local ascent) on 2 processes with
DALI on the CPU through the demo config, prints where the outputs are."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_train_run import worker_env

pytestmark = pytest.mark.slow


def test_demo_short(tmp_path):
    pytest.importorskip("nvidia.dali")
    pytest.importorskip("sklearn")
    data, out = tmp_path / "digits", tmp_path / "demo"
    cmd = [sys.executable, "-m", "dist_sam.cli", "demo", "--data-dir", str(data),
           "run.epochs=1", "data.image_size=16", f"run.output_dir={out}"]
    done = subprocess.run(cmd, env=worker_env(), cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (data / "train").is_dir() and (data / "val").is_dir()  # written because it was missing
    assert "torchrun --standalone --nproc_per_node=2 launch/train.py --config launch/configs/demo.yaml" in done.stdout
    assert f"outputs in {out}" in done.stdout
    summary = json.load(open(out / "summary.json"))
    assert summary["finished"] and summary["world_size"] == 2 and summary["history"][0]["num_samples"] == 360
    cfg = summary["config"]
    assert (cfg["sam"]["variant"], cfg["sam"]["ascent"], cfg["data"]["backend"]) == ("rwsam", "local", "dali")
    assert summary["comm_per_step"]["allreduce_calls_per_step"] == 1.0
    assert os.path.isfile(out / "model.pt") and os.listdir(out / "tensorboard")
