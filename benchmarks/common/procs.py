"""Processes for the benchmarks: ``n`` spawned ranks with a process group, or a world of one here.

:func:`spawn` runs ``worker(rank, world_size, payload)`` on ``world_size`` fresh processes
(``torch.multiprocessing`` spawn, gloo on CPU, NCCL for a CUDA device), collects one result per
rank and raises with every failing rank's traceback. :func:`world_of_one` gives a section of the
GPU check its own world-size-1 group on a free port and puts the environment back afterwards.
"""

from __future__ import annotations

import contextlib
import os
import socket
import traceback
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

__all__ = ["free_port", "spawn", "world_of_one", "backend_for"]


def free_port() -> int:
    """A TCP port on the loopback that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_for(device: str | torch.device) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _entry(worker: Callable, rank: int, world_size: int, port: int, payload: Any, threads: int, device: str,
           queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS=str(threads))
    try:
        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)
        if torch.device(device).type == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend_for(device), rank=rank, world_size=world_size)
        queue.put((rank, "ok", worker(rank, world_size, payload)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(worker: Callable[[int, int, Any], Any], world_size: int, payload: Any, *, timeout_s: float,
          threads: int = 1, device: str = "cpu") -> list[Any]:
    """``worker(rank, world_size, payload)`` on ``world_size`` spawned ranks; their results in rank order.

    ``worker`` and ``payload`` must be picklable (a module-level function, plain data). Each rank
    runs ``threads`` intra-op threads and one inter-op thread, on ``cuda:rank`` for a CUDA device.

    Raises:
        RuntimeError: a rank failed (every failing rank's traceback), or ``timeout_s`` passed.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_entry, args=(worker, r, world_size, port, payload, threads, device, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = [None] * world_size, []
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout_s)
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
            else:
                results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError(f"world size {world_size} failed:\n" + "\n".join(errors))
    return results


@contextlib.contextmanager
def world_of_one(device: str | torch.device = "cpu") -> Iterator[None]:
    """A world-size-1 process group on a free port (none made if one exists); the environment is
    put back afterwards."""
    if dist.is_initialized():
        yield
        return
    saved = dict(os.environ)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    try:
        dist.init_process_group(backend_for(device), rank=0, world_size=1)
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)
