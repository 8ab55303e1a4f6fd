"""Resuming in one process: damaged checkpoints skipped or refused, batch re-planning, stop signals,
the global-index data order, and the SLURM script's signal trap (with fake srun/scontrol)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dist_sam.checkpoint import PAYLOAD, list_checkpoints
from dist_sam.data import shard_plan
from dist_sam.optim.estimators import direction_seed
from dist_sam.train import cli
from dist_sam.train.config import load_config
from dist_sam.train.plan import BatchPlan, replan, source_rank
from dist_sam.train.preempt import StopSignal
from test_train_run import REPO, tiny_config, tiny_data, weights  # noqa: F401 (a fixture)

BASE = ["data.root=/nonexistent/dataset"]


@pytest.fixture(autouse=True)
def _one_thread_and_restore_determinism():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)


def _run(cfg: str, *overrides: str) -> int:
    return cli.main(["--config", cfg, *overrides])


@pytest.fixture
def two_checkpoints(tiny_data, tmp_path):
    """SGD (fast), checkpoints at steps 2 and 4 (every 2; epochs of 6 steps), stopped at 4."""
    out = str(tmp_path / "out")
    cfg = tiny_config(str(tmp_path / "c.yaml"), tiny_data, out, sam__all=None, checkpoint__keep_last=3)
    assert _run(cfg, "run.stop_at_step=4") == 0
    return cfg, out, list_checkpoints(os.path.join(out, "checkpoints"))


@pytest.mark.parametrize("damage", ["truncate", "nan"])
def test_auto_skips_a_damaged_newest_checkpoint_and_says_which(two_checkpoints, tmp_path, caplog, damage):
    cfg, out, ckpts = two_checkpoints
    assert [os.path.basename(p) for p in ckpts] == ["step_000000002", "step_000000004"]
    payload = os.path.join(ckpts[-1], PAYLOAD)
    if damage == "truncate":
        os.truncate(payload, 100)
    else:  # finite-looking file, valid checksum, NaN weights: only the weight check can tell
        from test_checkpoint import _rewrite_record
        state = torch.load(payload, weights_only=True)
        next(iter(state["model"].values())).fill_(float("nan"))
        torch.save(state, payload)
        _rewrite_record(ckpts[-1], open(payload, "rb").read())
    with caplog.at_level(logging.WARNING, logger="dist_sam.train"):
        assert _run(cfg, "run.stop_at_step=5") == 0
    summary = __import__("json").load(open(os.path.join(out, "summary.json")))
    assert summary["resumed_from"] == ckpts[0] and summary["global_step"] == 5
    text = caplog.text
    assert f"skipping damaged checkpoint {payload}" in text and ("truncated" in text or "non-finite" in text)
    assert f"resuming from {ckpts[0]}, the newest checkpoint that loads" in text


def test_explicit_damaged_checkpoint_raises_naming_file_and_cause(two_checkpoints, capsys):
    cfg, _, ckpts = two_checkpoints
    payload = os.path.join(ckpts[-1], PAYLOAD)
    with open(payload, "r+b") as fh:  # one flipped byte: same size, other checksum
        fh.seek(200)
        byte = fh.read(1)
        fh.seek(200)
        fh.write(bytes([byte[0] ^ 0xFF]))
    assert _run(cfg, f"checkpoint.resume={ckpts[-1]}") == 2
    err = capsys.readouterr().err
    assert payload in err and "SHA-256 differs" in err and "Traceback" not in err


def test_every_checkpoint_damaged_refuses_to_start_over_silently(two_checkpoints, capsys):
    cfg, _, ckpts = two_checkpoints
    for path in ckpts:
        os.unlink(os.path.join(path, PAYLOAD))
    assert _run(cfg) == 2
    err = capsys.readouterr().err
    assert "none of the 2 checkpoint(s) loads" in err and "missing" in err and "checkpoint.resume=never" in err


def test_torch_load_failure_is_one_line_not_a_traceback(two_checkpoints, capsys):
    cfg, _, ckpts = two_checkpoints
    payload = os.path.join(ckpts[-1], PAYLOAD)
    garbage = bytes(i % 251 for i in range(os.path.getsize(payload)))  # not a zip, not a pickle
    open(payload, "wb").write(garbage)
    from test_checkpoint import _rewrite_record
    _rewrite_record(ckpts[-1], garbage)
    assert _run(cfg, f"checkpoint.resume={ckpts[-1]}") == 2
    err = capsys.readouterr().err
    assert "torch.load failed" in err and payload in err and "Traceback" not in err


# -- batch plan -----------------------------------------------------------------------------------
def _cfg(*overrides: str):
    return load_config(None, BASE + ["sam.variant=sam", *overrides])


def test_replan_keeps_global_batch_and_group_size():
    cfg = _cfg()
    assert replan(BatchPlan(2, 16, 1), 1, cfg, "p") == BatchPlan(1, 32, 2)  # m = 16 stays
    assert replan(BatchPlan(1, 32, 2), 2, cfg, "p") == BatchPlan(2, 16, 1)
    assert replan(BatchPlan(2, 16, 2), 4, cfg, "p") == BatchPlan(4, 8, 1)  # m = 8
    assert replan(BatchPlan(2, 16, 1), 2, cfg, "p") == BatchPlan(2, 16, 1)
    new = BatchPlan(1, 32, 2)
    assert [source_rank(BatchPlan(2, 16, 1), new, 0)] == [0]
    assert [source_rank(BatchPlan(1, 32, 2), BatchPlan(2, 16, 1), r) for r in (0, 1)] == [0, 0]
    assert [source_rank(BatchPlan(4, 8, 1), BatchPlan(2, 16, 2), r) for r in (0, 1)] == [0, 2]


def test_replan_refuses_with_what_would_work():
    with pytest.raises(ValueError, match=r"world size 4 cannot keep both.*among 1, 2\b"):
        replan(BatchPlan(2, 16, 1), 4, _cfg(), "ckpt")  # b = 8 < m = 16
    with pytest.raises(ValueError, match=r"world size 3 .*among 1, 2, 4"):
        replan(BatchPlan(2, 16, 2), 3, _cfg(), "ckpt")
    with pytest.raises(ValueError, match="ascent='global'.*resume with world size 2"):
        replan(BatchPlan(2, 16, 1), 1, _cfg("sam.ascent=global"), "ckpt")


def test_rwsam_directions_follow_the_global_group():
    from dist_sam import create_optimizer

    opt = create_optimizer("rwsam", [torch.nn.Parameter(torch.zeros(2))], base="sgd", lr=0.1, seed=3)
    seeds = lambda rank, group: opt._direction_seed({"step": 5, "rank": rank, "group": group})  # noqa: E731
    assert seeds(1, 0) == direction_seed(3, 5, 1, 0)  # default: per (rank, group)
    opt.groups_per_rank = 1  # 2 workers, one group each ...
    two_workers = [seeds(0, 0), seeds(1, 0)]
    opt.groups_per_rank = 2  # ... or 1 worker, two groups: the same directions for the same samples
    assert [seeds(0, 0), seeds(0, 1)] == two_workers == [direction_seed(3, 5, 0, 0), direction_seed(3, 5, 1, 0)]


@pytest.mark.parametrize("n,batch", [(48, 8), (50, 4), (7, 1)])
def test_training_order_is_by_global_sample_index(n, batch):
    """A step's samples (in order) are the same for every world size with the same global batch."""
    def steps(world):
        plan = shard_plan(n, world_size=world, batch_size=batch * 4 // world, epoch=1, seed=2, train=True)
        rows = plan.indices.reshape(world, -1, batch * 4 // world)  # [rank, step, sample]
        return np.concatenate(list(rows), axis=1)  # [step, global position]
    assert np.array_equal(steps(1), steps(2)) and np.array_equal(steps(1), steps(4))
    order = np.random.default_rng(__import__("dist_sam.data.sharding", fromlist=["x"]).epoch_seed(2, 1)).permutation(n)
    assert np.array_equal(steps(2).reshape(-1)[:n], order)  # step s holds positions [s*B, (s+1)*B)


# -- stop signals ---------------------------------------------------------------------------------
def test_stop_signal_is_caught_recorded_and_uninstalled():
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopSignal(["SIGUSR1"], every=2).install()
    try:
        assert not stop.agreed(1) and not stop.agreed(2)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert stop.received == "SIGUSR1"
        assert not stop.agreed(3)  # checked every 2 steps only
        assert stop.agreed(4) and stop.stop_signal == "SIGUSR1"
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is before


@pytest.mark.parametrize("value", ["SIGKILL", "[SIGTERM, SIGNOPE]", "SIGTERM"])
def test_bad_signal_config_names_the_key(value):
    with pytest.raises(ValueError, match=r"checkpoint\.signals"):
        load_config(None, BASE + [f"checkpoint.signals={value}"])


def test_signal_mid_run_checkpoints_the_step_and_exits_75(tiny_data, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    cfg = tiny_config(str(tmp_path / "c.yaml"), tiny_data, out, sam__all=None, checkpoint__every_steps=0)
    monkeypatch.setenv("DIST_SAM_SIGNAL_AT_STEP", "0:3:SIGUSR1")  # during step 3 (its batch in hand)
    assert _run(cfg) == 75
    summary = __import__("json").load(open(os.path.join(out, "summary.json")))
    assert summary["preempted"] and summary["stop_signal"] == "SIGUSR1" and summary["global_step"] == 3
    assert [os.path.basename(p) for p in list_checkpoints(os.path.join(out, "checkpoints"))] == ["step_000000003"]
    monkeypatch.delenv("DIST_SAM_SIGNAL_AT_STEP")
    straight = str(tmp_path / "straight")
    assert _run(tiny_config(str(tmp_path / "s.yaml"), tiny_data, straight, sam__all=None)) == 0
    assert _run(cfg) == 0  # resumes at step 3: nothing lost, nothing redone
    from test_train_run import assert_bit_equal
    assert_bit_equal(weights(straight), weights(out))


# -- the SLURM script -----------------------------------------------------------------------------
FAKE_SRUN = """#!/usr/bin/env bash
echo "srun $*" >> "$FAKE_LOG"
trap 'echo "srun got TERM" >> "$FAKE_LOG"; exit 75' TERM
while true; do sleep 0.05; done
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
if [[ "$1 $2" == "show hostnames" ]]; then echo node7; exit 0; fi
echo "scontrol $*" >> "$FAKE_LOG"
"""


def _fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "log"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(log),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[7-8]", "SLURM_SUBMIT_DIR": REPO}
    return env, log


def test_sbatch_asks_for_an_early_signal_and_requeues():
    text = open(os.path.join(REPO, "launch", "slurm.sbatch")).read()
    assert "#SBATCH --signal=B:USR1@" in text and "#SBATCH --requeue" in text and "scontrol requeue" in text


@pytest.mark.parametrize("sig", ["USR1", "TERM"])
def test_sbatch_trap_forwards_the_signal_then_requeues_on_the_time_limit(tmp_path, sig):
    env, log = _fake_slurm(tmp_path)
    proc = subprocess.Popen(["bash", os.path.join(REPO, "launch", "slurm.sbatch"), "--config", "x.yaml"], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(200):  # until the fake srun runs
            if log.exists() and "srun" in log.read_text():
                break
            time.sleep(0.05)
        assert "--rdzv_endpoint=" in log.read_text() or "torchrun" in log.read_text()
        proc.send_signal(getattr(signal, f"SIG{sig}"))
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    lines = log.read_text().splitlines()
    assert proc.returncode == 75 and lines[1] == "srun got TERM", (lines, err)
    assert lines[2:] == (["scontrol requeue 4242"] if sig == "USR1" else [])  # SLURM requeues a preemption itself


def test_sbatch_does_not_requeue_without_a_signal(tmp_path):
    env, log = _fake_slurm(tmp_path)
    (tmp_path / "bin" / "srun").write_text('#!/usr/bin/env bash\necho "srun $*" >> "$FAKE_LOG"\nexit 3\n')
    done = subprocess.run(["bash", os.path.join(REPO, "launch", "slurm.sbatch")], env=env, capture_output=True, timeout=30)
    assert done.returncode == 3 and "requeue" not in log.read_text()


def test_sigterm_to_the_process_group_spares_the_data_workers(tiny_data, tmp_path):
    """torchrun signals a worker's whole process group: the DataLoader processes must not die with it,
    since the trainer reads on until the next agreement (every 5 steps here), then stops, exit 75."""
    out = str(tmp_path / "out")
    cfg = tiny_config(str(tmp_path / "c.yaml"), tiny_data, out, sam__all=None, data__num_workers=1,
                      checkpoint__signal_check_every=5, checkpoint__every_steps=0)
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "DIST_SAM_SIGNAL_AT_STEP": "0:1:SIGTERM:group"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, os.path.join(REPO, "launch", "train.py"), "--config", cfg], env=env,
                          capture_output=True, text=True, timeout=240, start_new_session=True)
    assert done.returncode == 75, done.stderr[-3000:]
    assert "caught SIGTERM" in done.stderr and "DataLoader worker" not in done.stderr
    assert [os.path.basename(p) for p in list_checkpoints(os.path.join(out, "checkpoints"))] == ["step_000000005"]
