"""Why a DeepSpeed run used to leave a process group alive into the interpreter's teardown (issue 20):
DeepSpeed 0.19.8's ``TorchBackend.barrier`` / ``monitored_barrier`` take ``GroupMember.WORLD`` as a
default argument, read when ``deepspeed.comm.torch`` is imported. ``dist_sam.train.ds.import_deepspeed``
(what ``launch/train.py --deepspeed`` calls before the default group exists) leaves no reference;
importing DeepSpeed after ``init_process_group`` keeps the group and its gloo threads alive after
``destroy_process_group``. Each case runs in a fresh interpreter (imports are once per process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _probe(import_first: bool) -> dict:
    code = f"""
import gc, json, os, socket, sys
import torch.distributed as dist
from dist_sam.train.ds import import_deepspeed, release_process_groups
if {import_first}:
    import_deepspeed()
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{{port}}", rank=0, world_size=1)
import_deepspeed()  # a no-op when it ran first: DeepSpeed is imported once per process
from deepspeed.comm.torch import TorchBackend
held = TorchBackend.barrier.__defaults__[0] is not None or TorchBackend.monitored_barrier.__defaults__[0] is not None
release_process_groups()
gc.collect()
threads = sorted(open(f"/proc/self/task/{{t}}/comm").read().strip() for t in os.listdir("/proc/self/task"))
print(json.dumps(dict(held=held, threads=threads)))
"""
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts native threads through /proc (Linux)")
def test_deepspeed_imported_first_holds_no_process_group_after_teardown():
    first = _probe(import_first=True)
    assert not first["held"]
    assert not [t for t in first["threads"] if "gloo" in t or "tcpstore" in t], first["threads"]
    late = _probe(import_first=False)  # the old order: the group outlives destroy_process_group
    assert late["held"] and [t for t in late["threads"] if "gloo" in t], late["threads"]
