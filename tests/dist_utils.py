"""Run a function on N real processes joined by a gloo process group (CPU), collect results.

    results = run_distributed(my_fn, world_size=2, args=(...))   # my_fn(rank, world_size, *args)

``my_fn`` must be defined at module level (it is pickled into spawned processes). Each process
gets ``torch.set_num_threads(1)`` and a fresh ``gloo`` default group; whatever ``my_fn`` returns
(CPU tensors, numbers, dicts of them) comes back as ``results[rank]``. An exception in any rank
fails the call with that rank's traceback.
"""

from __future__ import annotations

import io
import os
import queue as queue_module
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        buffer = io.BytesIO()  # plain bytes: tensors shared by fd would die with this process
        torch.save(fn(rank, world_size, *args), buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int = 2, args: tuple = (), timeout: float = 240.0) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors, pending = [None] * world_size, [], set(range(world_size))
    deadline, dead_since = time.monotonic() + timeout, None
    try:
        while pending:
            try:
                rank, status, value = queue.get(timeout=1.0)
            except queue_module.Empty:
                now = time.monotonic()
                dead = [r for r in pending if procs[r].exitcode is not None]
                if dead and dead_since is None:
                    dead_since = now  # its report may still be in the pipe: a grace period
                if dead and now - dead_since > 10:
                    raise AssertionError(f"rank(s) {dead} exited with {[procs[r].exitcode for r in dead]} without "
                                         f"reporting (a crash or an abort); errors so far: {errors}")
                if now > deadline:
                    raise AssertionError(f"rank(s) {sorted(pending)} reported nothing in {timeout:.0f} s (a hang); "
                                         f"errors so far: {errors}")
                continue
            pending.discard(rank)
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
            else:
                results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return results


class CollectiveCounts:
    """Calls and bytes of every torch.distributed collective made while ``active``, by name.

    The counter of tests/test_integrations_hf_deepspeed.py as an object: :meth:`install` wraps
    the ``torch.distributed`` functions once, before DeepSpeed or FSDP2 look any of them up.
    """

    NAMES = ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "all_gather",
             "all_gather_into_tensor", "all_gather_single", "broadcast", "all_to_all_single")

    def __init__(self) -> None:
        self.active: dict | None = None  # name -> [calls, bytes] while counting

    @staticmethod
    def nbytes(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, (list, tuple)):
            return sum(CollectiveCounts.nbytes(v) for v in value)
        return 0

    def install(self) -> "CollectiveCounts":
        for name in self.NAMES:
            fn = getattr(dist, name, None)
            if fn is None:
                continue

            def wrapper(*args, _fn=fn, _name=name, **kwargs):
                if self.active is not None:
                    entry = self.active.setdefault(_name, [0, 0])
                    entry[0] += 1
                    entry[1] += self.nbytes(list(args) + list(kwargs.values()))
                return _fn(*args, **kwargs)

            setattr(dist, name, wrapper)
        return self
