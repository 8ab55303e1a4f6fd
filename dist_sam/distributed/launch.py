"""Join the process group, whichever launcher started this process.

``init_distributed("env")`` trusts the environment: torchrun's variables, or SLURM's when ``srun``
starts the ranks directly. ``init_distributed("mpi")`` is the mpi4py bootstrap for ``mpirun``:
rank and size come from MPI, rank 0's address and a free port are broadcast, and the torchrun
variables (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) are set so
everything downstream (DDP, DeepSpeed) sees one kind of job.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import os
import socket
from typing import Any

import torch
import torch.distributed as dist

from .env import DEFAULT_MASTER_PORT, DistEnv, discover

__all__ = ["init_distributed", "mpi_bootstrap", "import_before_group", "shutdown_distributed", "LAUNCHERS", "default_backend"]

LAUNCHERS = ("env", "mpi")
_MPI_SOURCES = ("openmpi", "pmi", "pmix")
_MPI_INSTALL = "--launcher mpi needs mpi4py and an MPI library: pip install 'dist-sam[mpi]'"


# torch.distributed modules whose functions take ``group=dist.group.WORLD`` as a default argument:
# Python evaluates it at import, so a module first imported after ``init_process_group`` keeps the
# default group alive after ``destroy_process_group`` (fsdp/sharded_grad_scaler.py,
# optim/zero_redundancy_optimizer.py, nn/functional.py in torch 2.14). Its gloo threads then meet
# the interpreter's finalization, which aborts now and then ("terminate called without an active
# exception", SIGABRT after a finished run). Imported first, they bind ``None``: nothing is held.
# DeepSpeed's ``deepspeed.comm.torch`` does the same (dist_sam.train.ds.import_deepspeed).
_BIND_WORLD_AT_IMPORT = ("torch.distributed.fsdp", "torch.distributed.optim", "torch.distributed.nn")


def import_before_group() -> None:
    """Import the modules of :data:`_BIND_WORLD_AT_IMPORT` (before the default group exists)."""
    for name in _BIND_WORLD_AT_IMPORT:
        importlib.import_module(name)


def shutdown_distributed() -> None:
    """Destroy every process group and release what still holds them, while the interpreter runs.

    ``destroy_process_group`` empties torch's registry, but a group object lives on while anything
    references it; its gloo threads (``gloo_tcp_loop``, ``pt_gloo_runloop``) then run into the
    interpreter's finalization, which aborts now and then. Two holders are known in torch 2.14:
    a module that binds ``group.WORLD`` at import (:func:`import_before_group` takes them first),
    and the ``DeviceMesh`` of every FSDP2/DTensor model: DTensor's sharding-propagation caches keep
    the meshes alive after the model is gone, and a mesh keeps its groups in ``_pg_registry``.
    The groups are destroyed by then, so emptying that registry loses nothing.
    """
    import gc
    import sys

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
    mesh_module = sys.modules.get("torch.distributed.device_mesh")
    mesh_type = getattr(mesh_module, "DeviceMesh", None)
    if mesh_type is not None:  # only if a mesh can exist: the module was imported
        for obj in gc.get_objects():
            if isinstance(obj, mesh_type) and isinstance(getattr(obj, "_pg_registry", None), dict):
                obj._pg_registry.clear()
        gc.collect()


def default_backend() -> str:
    """``nccl`` with CUDA, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _host_address() -> str:
    """This host's address as other nodes reach it (the interface of the default route)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # UDP connect sends nothing; it only picks a route
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def _import_mpi() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise ImportError(_MPI_INSTALL) from err
    return MPI


def mpi_bootstrap(environ: dict | None = None) -> DistEnv:
    """Set the torchrun variables under MPI: rank 0 broadcasts its address and a port.

    Rank, size and local rank are read from the MPI launcher's variables by :func:`discover`
    (``OMPI_COMM_WORLD_*`` for OpenMPI, ``PMI_*``/``MPI_LOCALRANKID`` for MPICH and Intel MPI,
    ``PMIX_*``) and checked against ``MPI.COMM_WORLD``; a launcher that sets none falls back to the
    communicator (local rank: the rank among processes sharing memory). ``MASTER_ADDR`` and
    ``MASTER_PORT`` already in rank 0's environment win (a fixed port through a firewall, say).
    """
    environ = os.environ if environ is None else environ
    mpi = _import_mpi()
    comm = mpi.COMM_WORLD
    found = discover({k: v for k, v in environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")})
    if found.source in _MPI_SOURCES:
        if (found.rank, found.world_size) != (comm.Get_rank(), comm.Get_size()):
            raise RuntimeError(f"{found.source} variables say rank {found.rank} of {found.world_size}, MPI.COMM_WORLD "
                               f"says {comm.Get_rank()} of {comm.Get_size()}")
        rank, size, local_rank = found.rank, found.world_size, found.local_rank
    else:
        rank, size = comm.Get_rank(), comm.Get_size()
        local_rank = comm.Split_type(mpi.COMM_TYPE_SHARED).Get_rank()
    here = None
    if rank == 0:
        here = (environ.get("MASTER_ADDR") or _host_address(), int(environ.get("MASTER_PORT") or _free_port()))
    addr, port = comm.bcast(here, root=0)
    environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                   LOCAL_RANK=str(local_rank))
    return discover(environ)


def init_distributed(launcher: str = "env", backend: str | None = None, timeout_s: float = 1800.0,
                     always: bool = False) -> DistEnv:
    """Discover this process's rank and join the default process group when there are several.

    Args:
        launcher: ``"env"`` (torchrun, or ``srun`` with SLURM variables) or ``"mpi"`` (mpi4py
            bootstrap, for ``mpirun``/``mpiexec``).
        backend: ``nccl``/``gloo``; ``None`` picks ``nccl`` with CUDA, else ``gloo``.
        timeout_s: collective timeout.
        always: create a group even for one process (DeepSpeed needs one); the address is then
            ``127.0.0.1`` and a free port unless ``MASTER_ADDR``/``MASTER_PORT`` say otherwise.

    Returns:
        The :class:`DistEnv`; with one process no group is created (collectives are no-ops).

    Raises:
        ValueError: unknown launcher, or several processes but no rendezvous address.
        ImportError: ``launcher="mpi"`` without mpi4py.
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    env = mpi_bootstrap() if launcher == "mpi" else discover()
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    if dist.is_initialized() or (env.world_size == 1 and not always):
        return env
    if env.world_size == 1 and env.master_addr is None:
        env = dataclasses.replace(env, master_addr="127.0.0.1", master_port=env.master_port or _free_port())
    if env.master_addr is None:
        raise ValueError(
            f"{env.world_size} processes ({env.source} variables) but no rendezvous address: set "
            "MASTER_ADDR/MASTER_PORT, launch with torchrun, or use --launcher mpi under mpirun"
        )
    port = env.master_port or DEFAULT_MASTER_PORT
    os.environ.update(MASTER_ADDR=env.master_addr, MASTER_PORT=str(port), RANK=str(env.rank),
                      WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank))
    timeout = datetime.timedelta(seconds=timeout_s)
    import_before_group()
    dist.init_process_group(backend or default_backend(), store=_store(env.master_addr, port, env, timeout),
                            rank=env.rank, world_size=env.world_size, timeout=timeout)
    return env


def _store(addr: str, port: int, env: DistEnv, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store, its keys prefixed by torchrun's restart count.

    After ``--max-restarts`` restarts the workers, torchrun's agent store still holds the
    previous attempt's keys (gloo's peer addresses among them); without a per-attempt prefix the
    new ranks may read a dead peer's address and fail to connect.
    """
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(addr, port, env.world_size, is_master=not agent_hosts and env.rank == 0, timeout=timeout,
                          multi_tenant=not agent_hosts)
    return dist.PrefixStore(f"dist_sam/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
