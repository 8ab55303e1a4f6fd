"""Faults that stop every rank, named (dist_sam.train.faults): a failed checkpoint write.

What each test exercises:

* ``ulimit -f`` (``RLIMIT_FSIZE`` on both workers, world size 2, DDP): a real ``EFBIG`` from the
  kernel in rank 0's ``torch.save`` of the step-4 checkpoint, while rank 1 waits for it.
* a read-only checkpoint directory (mode 0555; the tests run as root, so the worker runs without
  ``CAP_DAC_OVERRIDE``, dropped from its capability bounding set, and the kernel refuses with a
  real ``EACCES`` when the staging directory is created).
* ``ENOSPC`` and ``EIO`` injected into the payload write (``DIST_SAM_CHECKPOINT_FAULT``), one process.
* ``ENOSPC`` injected into rank 1's DCP shard write under FSDP2 (world size 2): the failure
  crosses DCP's own gather and the trainer's agreement.

Each checks the exit status (74 on every rank, not the preemption's 75), the message (path and OS
error), that the previous checkpoint still loads, and (where cheap) that the next launch resumes.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import subprocess
import sys
import time

import pytest

from dist_sam.checkpoint import PAYLOAD, list_checkpoints, load_checkpoint, verify_checkpoint
from dist_sam.train import cli
from dist_sam.train.faults import CHECKPOINT_WRITE_EXIT
from dist_sam.train.models import build_model
from dist_utils import free_port
from test_train_run import REPO, TRAIN, tiny_config, tiny_data, worker_env  # noqa: F401 (a fixture)

SGD = dict(sam__all=None, checkpoint__every_steps=2, checkpoint__keep_last=3)


def launch(cfg: str, *overrides: str, world_size: int = 2, env: dict | None = None, preexec=None,
           timeout: float = 180) -> tuple[list[int], list[str], float]:
    """Start the workers without torchrun (each rank's own exit status); ``(statuses, logs, seconds)``."""
    port, start = str(free_port()), time.monotonic()
    base = worker_env(**(env or {}))
    if world_size > 1:
        base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=str(world_size))
    procs = [subprocess.Popen([sys.executable, TRAIN, "--config", cfg, *overrides], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=preexec,
                              env={**base, **({"RANK": str(r), "LOCAL_RANK": str(r)} if world_size > 1 else {})})
             for r in range(world_size)]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [p.returncode for p in procs], logs, time.monotonic() - start


def _names(out: str) -> list[str]:
    return [os.path.basename(p) for p in list_checkpoints(os.path.join(out, "checkpoints"))]


def _no_partial(out: str) -> bool:
    return not [n for n in os.listdir(os.path.join(out, "checkpoints")) if n.endswith(".partial")]


@pytest.mark.slow
def test_file_size_limit_stops_every_rank_with_74_and_the_next_launch_resumes(tiny_data, tmp_path):
    out = str(tmp_path / "out")
    cfg = tiny_config(str(tmp_path / "c.yaml"), tiny_data, out, **SGD)
    codes, logs, _ = launch(cfg, "run.stop_at_step=2")
    assert codes == [0, 0], logs[0][-3000:]
    size = os.path.getsize(os.path.join(out, "checkpoints", "step_000000002", PAYLOAD))

    def limit():  # what a full disk looks like to the writer: write() fails with EFBIG past the limit
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))  # Python ignores SIGXFSZ

    codes, logs, seconds = launch(cfg, preexec=limit)
    assert codes == [CHECKPOINT_WRITE_EXIT] * 2 and seconds < 60, (codes, seconds, logs[0][-3000:], logs[1][-3000:])
    for log in logs:  # every rank names the failing rank, the file and the OS error; no traceback
        assert "writing the checkpoint of step 3 failed on rank 0" in log, log[-3000:]  # the epoch's end
        assert f"{os.path.join(out, 'checkpoints', '.step_000000003.partial', PAYLOAD)}: EFBIG [Errno 27] File too large" in log
        assert "Traceback" not in log
    assert _names(out) == ["step_000000002"] and _no_partial(out)
    load_checkpoint(os.path.join(out, "checkpoints", "step_000000002"))
    codes, logs, _ = launch(cfg, "run.stop_at_step=4")
    assert codes == [0, 0], logs[0][-3000:]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["global_step"] == 4 and summary["resumed_from"].endswith("step_000000002")


def _drop_dac_override() -> None:
    """Without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (bounding set, before exec), root obeys mode bits."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_read_only_checkpoint_directory_exits_74_naming_it(tiny_data, tmp_path):
    out = str(tmp_path / "out")
    cfg = tiny_config(str(tmp_path / "c.yaml"), tiny_data, out, **SGD)
    assert cli.main(["--config", cfg, "run.stop_at_step=2"]) == 0
    ckpt = os.path.join(out, "checkpoints")
    os.chmod(ckpt, 0o555)
    try:
        codes, logs, _ = launch(cfg, world_size=1, preexec=_drop_dac_override if os.geteuid() == 0 else None)
    finally:
        os.chmod(ckpt, 0o755)
    assert codes == [CHECKPOINT_WRITE_EXIT], logs[0][-3000:]
    assert f"{os.path.join(ckpt, '.step_000000004.partial')}: EACCES [Errno 13] Permission denied" in logs[0]
    assert "writing the checkpoint of step 4 failed" in logs[0] and "Traceback" not in logs[0]
    assert _names(out) == ["step_000000002"]
    load_checkpoint(os.path.join(ckpt, "step_000000002"))


@pytest.mark.parametrize("code,text", [("ENOSPC", "No space left on device"), ("EIO", "Input/output error")])
def test_injected_write_error_exits_74_and_keeps_the_previous_checkpoint(tiny_data, tmp_path, monkeypatch, capsys,
                                                                        code, text):
    out = str(tmp_path / "out")
    cfg = tiny_config(str(tmp_path / "c.yaml"), tiny_data, out, **SGD)
    monkeypatch.setenv("DIST_SAM_CHECKPOINT_FAULT", f"0:{code}:4")
    assert cli.main(["--config", cfg]) == CHECKPOINT_WRITE_EXIT
    err = capsys.readouterr().err
    assert f".step_000000004.partial/{PAYLOAD}: {code} [Errno" in err and text in err and "failed on rank" not in err
    assert _names(out) == ["step_000000002"] and _no_partial(out)
    monkeypatch.delenv("DIST_SAM_CHECKPOINT_FAULT")
    if code == "ENOSPC":
        assert cli.main(["--config", cfg]) == 0
        assert json.load(open(os.path.join(out, "summary.json")))["resumed_from"].endswith("step_000000002")


@pytest.mark.slow
def test_dcp_shard_write_failure_on_rank_1_stops_both_ranks(tiny_data, tmp_path):
    out = str(tmp_path / "out")
    cfg = tiny_config(str(tmp_path / "c.yaml"), tiny_data, out, model__parallel="fsdp", **SGD)
    codes, logs, seconds = launch(cfg, "run.stop_at_step=4", env={"DIST_SAM_CHECKPOINT_FAULT": "1:ENOSPC:3"})
    assert codes == [CHECKPOINT_WRITE_EXIT] * 2 and seconds < 60, (codes, logs[0][-3000:], logs[1][-3000:])
    shard = os.path.join(out, "checkpoints", ".step_000000003.partial", "dcp", "__1_0.distcp")
    for log in logs:
        assert f"writing the checkpoint of step 3 failed on rank 1: {shard}: ENOSPC [Errno 28]" in log, log[-3000:]
    assert _names(out) == ["step_000000002"] and _no_partial(out)
    assert "dcp/__1_0.distcp" in verify_checkpoint(os.path.join(out, "checkpoints", "step_000000002"))["files"]


@pytest.mark.parametrize("status", [74, 69, 65])
def test_sbatch_does_not_requeue_a_fault_even_after_the_time_limit_signal(tmp_path, status):
    from test_train_resume import _fake_slurm

    env, log = _fake_slurm(tmp_path)
    (tmp_path / "bin" / "srun").write_text('#!/usr/bin/env bash\necho "srun $*" >> "$FAKE_LOG"\n'
                                           f"trap 'exit {status}' TERM\nwhile true; do sleep 0.05; done\n")
    proc = subprocess.Popen(["bash", os.path.join(REPO, "launch", "slurm.sbatch")], env=env, text=True,
                            stderr=subprocess.PIPE)
    try:
        for _ in range(200):
            if log.exists() and "srun" in log.read_text():
                break
            time.sleep(0.05)
        proc.send_signal(__import__("signal").SIGUSR1)
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == status and "requeue" not in log.read_text()


# -- a peer that stops answering --------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (torchrun puts each worker in a session of its own)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, parent in parents.items() if parent in frontier]
        found += kids
        frontier = kids
    return found


def _state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _workers(pid: int) -> list[int]:
    return [p for p in _children(pid) if TRAIN in open(f"/proc/{p}/cmdline").read().replace("\0", " ")
            and "torch.distributed.run" not in open(f"/proc/{p}/cmdline").read()]


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_a_stopped_rank_times_the_other_out_named_and_torchrun_restarts_from_the_checkpoint(tiny_data, tmp_path):
    """Rank 1 SIGSTOPs itself with step 3's batch in hand (first attempt); rank 0, blocked in step 3's
    gradient all-reduce, gets SIGTERM there too, and still ends within the 20 s timeout, named, 69."""
    out = str(tmp_path / "out")
    cfg = tiny_config(str(tmp_path / "c.yaml"), tiny_data, out, **SGD)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           "--monitor-interval=0.5", TRAIN, "--config", cfg, "--collective-timeout-s", "20", "run.stop_at_step=4"]
    log = open(tmp_path / "log", "w+")
    proc = subprocess.Popen(cmd, cwd=REPO, env=worker_env(DIST_SAM_SIGNAL_AT_STEP="1:3:SIGSTOP"), stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    try:
        stopped = _wait(lambda: [p for p in _workers(proc.pid) if _state(p) == "T"], 120, "rank 1 to stop")[0]
        start = time.monotonic()
        other = [p for p in _workers(proc.pid) if p != stopped]
        time.sleep(2)
        os.kill(other[0], __import__("signal").SIGTERM)  # caught: the step in flight cannot finish
        _wait(lambda: _state(other[0]) in ("gone", "Z"), 60, "rank 0 to exit")
        waited = time.monotonic() - start
        # torchrun's SIGTERM to the stopped rank is pending: let it act (else torchrun waits 30 s to SIGKILL)
        os.kill(stopped, __import__("signal").SIGCONT)
        assert proc.wait(timeout=180) == 0
    finally:
        for pid in _children(proc.pid) + [proc.pid]:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
    log.seek(0)
    text = log.read()
    assert waited < 20 + 10, (waited, text[-4000:])
    assert ("rank 0: a collective timed out after run.collective_timeout_s=20 s during global step 3; rank 1 did "
            "not answer") in text, text[-4000:]
    assert "exitcode: 69" in text or "exitcode  : 69" in text, text[-4000:]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["global_step"] == 4 and summary["resumed_from"].endswith("step_000000002")


# -- non-finite storms -----------------------------------------------------------------------------
SAM_ONLY = dict(sam__variant="sam", sam__lam=None, sam__mu=None, checkpoint__every_steps=2, checkpoint__keep_last=3)


def _sam_config(path, data, out, **overrides):
    import yaml

    cfg = tiny_config(path, data, out, **{**SAM_ONLY, **overrides})
    tree = yaml.safe_load(open(cfg))
    tree["sam"] = {k: v for k, v in tree["sam"].items() if v is not None}
    yaml.safe_dump(tree, open(cfg, "w"))
    return cfg


@pytest.mark.slow
def test_nan_ascent_losses_on_rank_1_stop_both_ranks_after_max_skipped_steps(tiny_data, tmp_path):
    out = str(tmp_path / "out")
    cfg = _sam_config(str(tmp_path / "c.yaml"), tiny_data, out, run__max_skipped_steps=2)
    codes, logs, _ = launch(cfg, env={"DIST_SAM_NAN_LOSS": "1:3:ascent"})
    assert codes == [65, 65], (codes, logs[0][-3000:], logs[1][-3000:])
    for log in logs:
        assert ("2 non-finite steps in a row (run.max_skipped_steps=2), the last at global step 4: the ascent pass "
                "(non-finite on rank(s) [1]) overflowed; no loss scaling") in log, log[-3000:]
    # step 3 (skipped, the epoch's end) was checkpointed with the untouched, finite weights; nothing after
    assert _names(out) == ["step_000000002", "step_000000003"]
    two, three = (load_checkpoint(os.path.join(out, "checkpoints", n))["model"] for n in _names(out))
    params = [n for n, _ in build_model("small_cnn", num_classes=4).named_parameters()]  # BN statistics move
    assert params and all(two[k].equal(three[k]) for k in params)


def test_nan_descent_losses_name_the_descent_pass(tiny_data, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "out")
    cfg = _sam_config(str(tmp_path / "c.yaml"), tiny_data, out, run__max_skipped_steps=3)
    monkeypatch.setenv("DIST_SAM_NAN_LOSS", "0:2:descent")
    assert cli.main(["--config", cfg]) == 65
    err = capsys.readouterr().err
    assert "3 non-finite steps in a row (run.max_skipped_steps=3), the last at global step 4: the descent pass" in err
    assert _names(out) == ["step_000000002"]  # step 2 (skipped: weights untouched) saved; step 4 raised first


# -- world-size changes under micro ascent (plan) ----------------------------------------------------
def _micro(*overrides):
    from dist_sam.train.config import load_config

    return load_config(None, ["data.root=/nonexistent", "sam.variant=sam", "sam.ascent=micro",
                              "sam.micro_batch_size=32", *overrides])


def test_micro_ascent_replans_by_micro_batch_size_both_ways():
    from dist_sam.train.plan import BatchPlan, replan, working_sizes

    cfg = _micro()
    assert replan(BatchPlan(1, 64, 1), 2, cfg, "p") == BatchPlan(2, 32, 1)  # the 1 -> 2: m = 32 kept
    assert replan(BatchPlan(2, 32, 1), 1, cfg, "p") == BatchPlan(1, 64, 2)  # shrink: f = 32 still divides b'
    assert replan(BatchPlan(1, 128, 2), 4, cfg, "p") == BatchPlan(4, 32, 1)
    assert working_sizes(BatchPlan(1, 64, 1), cfg) == [1, 2]
    with pytest.raises(ValueError, match=r"64, 32 samples per micro-batch.*world size 4 cannot keep both.*among 1, 2 "
                                         r"\(divisors of 2 = global batch / micro_batch_size\)"):
        replan(BatchPlan(1, 64, 1), 4, cfg, "p")
    assert working_sizes(BatchPlan(2, 32, 1), _micro("sam.ascent=global")) == [2]


@pytest.mark.slow
def test_micro_ascent_grows_1_to_2_and_matches_the_uninterrupted_run(tiny_data, tmp_path):
    """Batch 16 at world size 1, micro-batches of 8 (k = 1, f = 16, which world size 2 cannot keep)."""
    micro = dict(sam__ascent="micro", sam__micro_batch_size=8, data__batch_size=16)
    straight, out = str(tmp_path / "straight"), str(tmp_path / "grown")
    cfg_s = _sam_config(str(tmp_path / "s.yaml"), tiny_data, straight, **micro)
    cfg = _sam_config(str(tmp_path / "c.yaml"), tiny_data, out, **micro)
    for config, overrides, size in ((cfg_s, (), 1), (cfg, ("run.stop_at_step=2",), 1), (cfg, (), 2)):
        codes, logs, _ = launch(config, *overrides, world_size=size)
        assert set(codes) == {0}, logs[0][-3000:]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["finished"] and summary["resumed_from"].endswith("step_000000002")
    assert summary["batch_plan"] == {"world_size": 2, "batch_size": 8, "accumulation_steps": 1}
    a, b = (__import__("torch").load(os.path.join(d, "model.pt"), weights_only=True) for d in (straight, out))
    params = [n for n, _ in build_model("small_cnn", num_classes=4).named_parameters()]
    diff = max((a[n].double() - b[n].double()).abs().max().item() for n in params)
    print(f"\nmicro 1 -> 2: max |w_straight - w_grown| over parameters = {diff:.3g}")
    assert diff <= 1e-5  # fp32 reduction order (the DDP average of 2 groups vs their sum on one worker)


# -- the collective timeout reaches init_process_group --------------------------------------------
def test_collective_timeout_reaches_init_process_group_from_config_and_flag(monkeypatch, tmp_path):
    """Every launcher (env, mpi, --deepspeed) joins through init_distributed, which cli calls with the timeout."""
    import datetime

    import torch.distributed as dist

    from dist_sam.distributed import launch as launch_mod

    seen = {}

    def stop(**kwargs):
        seen.update(kwargs)
        raise SystemExit(0)  # only the handshake is under test

    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: stop(**kwargs))
    monkeypatch.setattr(launch_mod, "_store", lambda addr, port, env, timeout: seen.update(store_timeout=timeout))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit):
        launch_mod.init_distributed("env", timeout_s=20.0, always=True)
    assert seen["timeout"] == seen["store_timeout"] == datetime.timedelta(seconds=20)
    monkeypatch.setattr(cli, "init_distributed", lambda launcher, timeout_s, always: stop(timeout_s=timeout_s))
    cfg = tiny_config(str(tmp_path / "c.yaml"), str(tmp_path), str(tmp_path / "out"))
    for argv, expect in (([], 600.0), (["run.collective_timeout_s=45"], 45.0), (["--collective-timeout-s", "20"], 20.0)):
        with pytest.raises(SystemExit):
            cli.main(["--config", cfg, *argv])
        assert seen["timeout_s"] == expect
    assert cli.main(["--config", cfg, "run.collective_timeout_s=0"]) == 2  # refused, naming the key


@pytest.mark.slow
def test_a_rank_dying_outside_torchrun_stops_the_other_at_once_named(tiny_data, tmp_path):
    """Rank 1 SIGKILLs itself after step 3 (no torchrun to notice); rank 0's next collective (the stop
    agreement) fails at once, not after the 600 s timeout, and it exits 69 naming the step."""
    out = str(tmp_path / "out")
    cfg = tiny_config(str(tmp_path / "c.yaml"), tiny_data, out, **SGD)
    codes, logs, seconds = launch(cfg, env={"DIST_SAM_FAULT_AT_STEP": "1:3"}, timeout=120)
    assert codes == [69, -9], (codes, logs[0][-3000:])
    assert "a collective lost its peer (it closed the connection: died or was killed) after global step 3; rank 1 " \
           "did not answer" in logs[0], logs[0][-3000:]
    assert seconds < 90  # start-up included; the default timeout is 600 s
