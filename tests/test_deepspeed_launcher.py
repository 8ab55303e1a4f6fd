"""launch/deepspeed.sh end to end on CPU: the ``deepspeed`` launcher, 2 processes, the ``sam``
section of launch/configs/ds_demo_cpu.json (ZeRO-2, RW-SAM), checkpoint and resume through the
engine: stopping at step 2 and rerunning the same command equals the uninterrupted run bit for bit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from test_train_run import REPO, assert_bit_equal, make_tiny_dataset, tiny_config, weights, worker_env

pytestmark = pytest.mark.slow
pytest.importorskip("deepspeed")
SCRIPT = os.path.join(REPO, "launch", "deepspeed.sh")
DS_CONFIG = os.path.join(REPO, "launch", "configs", "ds_demo_cpu.json")


def _launch(cfg: str, port: int, *overrides: str) -> subprocess.CompletedProcess:
    bin_dir = os.path.dirname(sys.executable)
    env = worker_env(NUM_GPUS="2", DS_CONFIG=DS_CONFIG, PYTHON=sys.executable, MASTER_PORT=str(port),
                     PATH=os.pathsep.join([bin_dir, os.environ.get("PATH", "")]))
    env.pop("DS_ACCELERATOR", None)  # the script picks the CPU accelerator itself without CUDA
    if shutil.which("deepspeed", path=env["PATH"]) is None:
        pytest.skip("no deepspeed launcher executable")
    done = subprocess.run(["bash", SCRIPT, "--config", cfg, *overrides], env=env, capture_output=True, text=True,
                          timeout=400, cwd=REPO)
    assert done.returncode == 0, f"--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-6000:]}"
    return done


def _summary(out: str) -> dict:
    with open(os.path.join(out, "summary.json")) as fh:
        return json.load(fh)


def test_deepspeed_sh_trains_checkpoints_and_resumes(tmp_path):
    from dist_utils import free_port

    data = make_tiny_dataset(str(tmp_path / "data"))
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    _launch(tiny_config(str(tmp_path / "a.yaml"), data, straight, run__epochs=1), free_port())
    summary = _summary(straight)
    assert summary["finished"] and summary["world_size"] == 2 and summary["global_step"] == 3, summary

    cfg = tiny_config(str(tmp_path / "b.yaml"), data, split, run__epochs=1)
    _launch(cfg, free_port(), "run.stop_at_step=2")
    assert not _summary(split)["finished"]
    assert open(os.path.join(split, "checkpoints", "latest")).read().strip() == "step_000000002"
    _launch(cfg, free_port())  # the same command again: resumes from the engine's checkpoint
    summary = _summary(split)
    assert summary["finished"] and summary["global_step"] == 3 and "step_000000002" in summary["resumed_from"]
    assert_bit_equal(weights(straight), weights(split))
