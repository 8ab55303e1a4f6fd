"""Atomic rank-0 checkpoints: keep-last-K, weights_only loading, refusals, a kill mid-write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from dist_sam.checkpoint import (CheckpointError, config_diff, latest_checkpoint, list_checkpoints, load_checkpoint,
                                 save_checkpoint)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = {"optim": {"lr": 0.1}, "run": {"output_dir": "a"}, "sam": {"variant": "rwsam", "rho": 0.05}}


def _state(value: float = 1.0, config=CONFIG) -> dict:
    return {"model": {"w": torch.full((3,), value), "n": torch.tensor(2)}, "config": config, "rng": [{"pos": 1}]}


def test_save_is_loadable_with_weights_only_and_keeps_last_k(tmp_path):
    for step in (2, 4, 6, 8):
        path = save_checkpoint(_state(step), str(tmp_path), step=step, keep_last=2)
        assert os.path.basename(path) == f"ckpt_{step:09d}.pt"
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["ckpt_000000006.pt", "ckpt_000000008.pt"]
    state = torch.load(latest_checkpoint(str(tmp_path)), weights_only=True)
    assert torch.equal(state["model"]["w"], torch.full((3,), 8.0)) and state["config"] == CONFIG
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert latest_checkpoint(str(tmp_path / "missing")) is None


def test_refuses_non_finite_weights(tmp_path):
    state = _state()
    state["model"]["w"][1] = float("nan")
    path = save_checkpoint(state, str(tmp_path), step=1)
    with pytest.raises(CheckpointError, match="non-finite.*'w'"):
        load_checkpoint(path)


def test_refuses_another_config_naming_the_key(tmp_path):
    path = save_checkpoint(_state(), str(tmp_path), step=1)
    other = {**CONFIG, "optim": {"lr": 0.2}, "run": {"output_dir": "b"}}
    with pytest.raises(CheckpointError, match=r"optim\.lr: 0\.1 -> 0\.2"):
        load_checkpoint(path, config=other)
    load_checkpoint(path, config={**CONFIG, "run": {"output_dir": "b"}}, ignore=["run.output_dir"])
    assert config_diff({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}, ignore=["x.*"]) == ["a.c: '<unset>' -> 2"]
    assert config_diff({"checkpoint": {"dir": "x"}}, {"checkpoint": {"dir": "y"}}, ignore=["checkpoint.*"]) == []


def test_refuses_pickled_objects(tmp_path):
    path = str(tmp_path / "ckpt_000000001.pt")
    torch.save({"model": {}, "evil": object()}, path)
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_checkpoint(path)


_WRITER = textwrap.dedent("""
    import os, sys, time, torch
    from dist_sam import checkpoint
    directory = sys.argv[1]
    checkpoint.save_checkpoint({"model": {"w": torch.ones(4)}}, directory, step=1)
    def stall(fd):  # the data is written but not yet synced or renamed: kill here
        print("writing", flush=True)
        time.sleep(120)
    checkpoint.os.fsync = stall
    checkpoint.save_checkpoint({"model": {"w": torch.zeros(1_000_000)}}, directory, step=2)
""")


def test_kill_during_write_leaves_previous_checkpoint_loadable(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]  # mid-write
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["ckpt_000000001.pt"]
    assert torch.equal(load_checkpoint(latest_checkpoint(str(tmp_path)))["model"]["w"], torch.ones(4))
    save_checkpoint({"model": {"w": torch.ones(1)}}, str(tmp_path), step=3)  # the next save cleans the stray file
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
