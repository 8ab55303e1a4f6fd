"""No process-group thread is left when a training run ends, finished or failed (issue 20).

A gloo group that outlives ``main()`` meets the interpreter's finalization, which aborted now and
then: "terminate called without an active exception", SIGABRT (-6) instead of the run's own
status, seen in CI after a finished FSDP2 run and after a failed checkpoint write under DDP. The
abort is a race; what causes it is not: a group still referenced after ``destroy_process_group``.
Three holders were found and are released (``dist_sam.distributed.launch.shutdown_distributed``):
modules that bind ``group.WORLD`` at import, DTensor's caches keeping FSDP2's device meshes, and a
failed ``torch.save`` whose error kept the trainer through a cycle across C++. Each case here is a
real 2-rank torchrun job whose ranks list their native threads after ``main()`` returns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from test_train_run import REPO, make_tiny_dataset, tiny_config, worker_env

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists native threads through /proc (Linux)")]
PROBE = os.path.join(REPO, "tests", "teardown_main.py")
GROUP_THREADS = ("gloo", "pt_gloo", "tcpstore")
SAM = dict(sam__variant="sam", sam__lam=None, sam__mu=None)


def _held(threads: list[str]) -> list[str]:
    return [t for t in threads if any(k in t for k in GROUP_THREADS)]


def _run(tmp_path, name: str, *args: str, env: dict | None = None, **overrides) -> list[dict]:
    data = make_tiny_dataset(str(tmp_path / "data"))
    cfg = tiny_config(str(tmp_path / f"{name}.yaml"), data, str(tmp_path / name), **{**SAM, **overrides})
    tree = yaml.safe_load(open(cfg))
    tree["sam"] = {k: v for k, v in tree["sam"].items() if v is not None}  # plain SAM: no RW-SAM keys
    yaml.safe_dump(tree, open(cfg, "w"))
    out = tmp_path / f"{name}_threads"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", PROBE,
           "--config", cfg, "run.stop_at_step=3", *args]
    done = subprocess.run(cmd, env=worker_env(TEARDOWN_OUT=str(out), **(env or {})), capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    reports = [json.load(open(out / f"rank{r}.json")) for r in range(2) if (out / f"rank{r}.json").exists()]
    assert len(reports) == 2, done.stderr[-4000:]
    assert "terminate called" not in done.stderr, done.stderr[-4000:]
    return reports


def test_a_finished_ddp_run_leaves_no_group_thread(tmp_path):
    reports = _run(tmp_path, "ddp")
    assert [r["status"] for r in reports] == [0, 0]
    assert [_held(r["threads"]) for r in reports] == [[], []], reports


def test_a_finished_fsdp_run_leaves_no_group_thread_and_the_bare_teardown_did(tmp_path):
    reports = _run(tmp_path, "fsdp", model__parallel="fsdp")
    assert [r["status"] for r in reports] == [0, 0]
    assert [_held(r["threads"]) for r in reports] == [[], []], reports
    # control: destroy_process_group alone leaves FSDP2's group (held by DTensor's cached meshes)
    bare = _run(tmp_path, "fsdp_bare", model__parallel="fsdp", env={"TEARDOWN_BARE": "1"})
    assert all(_held(r["threads"]) for r in bare), bare


def test_a_failed_checkpoint_write_leaves_no_group_thread_on_the_failing_rank(tmp_path):
    from dist_sam.train.faults import CHECKPOINT_WRITE_EXIT

    reports = _run(tmp_path, "efbig", env={"DIST_SAM_CHECKPOINT_FAULT": "0:EFBIG:2"})
    assert [r["status"] for r in reports] == [CHECKPOINT_WRITE_EXIT] * 2
    assert [_held(r["threads"]) for r in reports] == [[], []], reports


def _fresh(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter (imports happen once per process); its threads at the end."""
    tail = "\nimport os, json\nprint(json.dumps(sorted(open(f'/proc/self/task/{t}/comm').read().strip() " \
           "for t in os.listdir('/proc/self/task'))))\n"
    env = worker_env()
    for key in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, "-c", code + tail], env=env, capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_modules_that_bind_the_world_group_at_import_are_imported_before_it():
    # torch.distributed.optim's ZeroRedundancyOptimizer takes group=dist.group.WORLD as a default
    joined = _fresh("from dist_sam.distributed.launch import init_distributed, shutdown_distributed\n"
                    "init_distributed('env', always=True)\nimport torch.distributed.optim\nshutdown_distributed()")
    assert _held(joined) == [], joined
    # control: the same import after a bare init_process_group keeps the group past its destruction
    bare = _fresh("import socket, torch.distributed as dist\ns = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()\n"
                  "dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=0, "
                  "world_size=1)\nimport torch.distributed.optim\ndist.destroy_process_group()\nimport gc; gc.collect()")
    assert _held(bare), bare
