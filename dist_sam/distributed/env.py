"""Rank discovery, in one place: torchrun, then MPI/PMI, then SLURM, else a single process.

Every launcher dist-sam supports ends up here:

=========================  ==========================================  ==========================
launcher                   rank / world size / local rank              rendezvous address
=========================  ==========================================  ==========================
``torchrun``               ``RANK`` ``WORLD_SIZE`` ``LOCAL_RANK``      ``MASTER_ADDR``/``_PORT``
OpenMPI ``mpirun``         ``OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK}``  broadcast by mpi4py
MPICH/Intel MPI (PMI)      ``PMI_RANK`` ``PMI_SIZE`` ``MPI_LOCALRANKID``  broadcast by mpi4py
PMIx                       ``PMIX_RANK`` ``PMIX_SIZE`` ...             broadcast by mpi4py
SLURM ``srun``             ``SLURM_PROCID`` ``SLURM_NTASKS`` ...       first host of the nodelist
=========================  ==========================================  ==========================
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Mapping

__all__ = ["DistEnv", "discover", "expand_nodelist", "DEFAULT_MASTER_PORT"]

DEFAULT_MASTER_PORT = 29500

# (launcher, rank, world size, local rank) variable names, in order of precedence.
_SOURCES = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("pmi", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("pmix", "PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)
# (number of nodes, this node's index) per source; torchrun's GROUP_RANK is the node rank.
_NODES = {
    "torchrun": ("NNODES", "GROUP_RANK"),
    "openmpi": (None, "OMPI_COMM_WORLD_NODE_RANK"),
    "slurm": ("SLURM_NNODES", "SLURM_NODEID"),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistEnv:
    """Where this process sits in the job.

    Attributes:
        rank: global rank.
        world_size: number of processes.
        local_rank: rank on this node (selects the GPU).
        source: which launcher's variables were read (``torchrun``, ``openmpi``, ``pmi``, ``pmix``,
            ``slurm`` or ``single``).
        master_addr: the rendezvous host, when the environment names one (``MASTER_ADDR``, else
            the first host of ``SLURM_JOB_NODELIST`` under SLURM); ``None`` otherwise.
        master_port: the rendezvous port (``MASTER_PORT``, else ``DEFAULT_MASTER_PORT`` when
            ``master_addr`` is known); ``None`` otherwise.
        num_nodes: number of nodes, when the launcher says (else 1).
        node_rank: this node's index, when the launcher says (else 0).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    source: str = "single"
    master_addr: str | None = None
    master_port: int | None = None
    num_nodes: int = 1
    node_rank: int = 0

    @property
    def is_primary(self) -> bool:
        """True on global rank 0, the process that logs and writes checkpoints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {env[name]!r}") from None


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist: ``"gpu[01-03,07],login"`` -> ``["gpu01", "gpu02", "gpu03", "gpu07", "login"]``.

    Zero padding is kept (``[08-10]`` gives ``08 09 10``). Raises ``ValueError`` on a malformed list.
    """
    hosts: list[str] = []
    for entry in _split_top_level(nodelist):
        if not re.fullmatch(r"(?:[^\[\],]+|\[[^\[\]]+\])+", entry):
            raise ValueError(f"malformed SLURM nodelist {nodelist!r} (at {entry!r})")
        expanded = [""]
        for literal, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", entry):
            options = [literal]
            if ranges:
                options = [literal + item for item in _expand_ranges(ranges, nodelist)]
            expanded = [head + tail for head in expanded for tail in options]
        hosts += expanded
    if not hosts:
        raise ValueError(f"empty SLURM nodelist {nodelist!r}")
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    """Split on the commas outside brackets (commas inside brackets separate ranges)."""
    entries, depth, current = [], 0, ""
    for char in nodelist:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            entries.append(current)
            current = ""
        else:
            current += char
    return [e for e in entries + [current] if e]


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    items = []
    for part in ranges.split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"malformed range {part!r} in SLURM nodelist {nodelist!r}")
        width = len(lo)
        items += [str(i).zfill(width) for i in range(int(lo), int(hi if sep else lo) + 1)]
    return items


def _rendezvous(env: Mapping[str, str], source: str) -> tuple[str | None, int | None]:
    addr = env.get("MASTER_ADDR")
    if not addr and source == "slurm":
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = expand_nodelist(nodelist)[0] if nodelist else None
    port = _int(env, "MASTER_PORT") if env.get("MASTER_PORT") else None
    if addr and port is None:
        port = DEFAULT_MASTER_PORT
    return addr or None, port


def discover(env: Mapping[str, str] | None = None) -> DistEnv:
    """Read rank, world size and local rank from the launcher's environment variables.

    Args:
        env: the environment to read (defaults to ``os.environ``).

    Returns:
        The first source whose rank and world-size variables are both set; a single process
        when none is.

    Raises:
        ValueError: a variable is not an integer, or the rank is outside ``[0, world_size)``.
    """
    env = os.environ if env is None else env
    for source, rank_var, size_var, local_var in _SOURCES:
        if rank_var in env and size_var in env:
            rank, size = _int(env, rank_var), _int(env, size_var)
            local = _int(env, local_var) if local_var in env else rank
            if size < 1 or not 0 <= rank < size:
                raise ValueError(f"{rank_var}={rank} is outside [0, {size_var}={size})")
            nodes_var, node_var = _NODES.get(source, (None, None))
            num_nodes = _int(env, nodes_var) if nodes_var and env.get(nodes_var, "").isdigit() else 1
            node_rank = _int(env, node_var) if node_var and node_var in env else 0
            addr, port = _rendezvous(env, source)
            return DistEnv(rank=rank, world_size=size, local_rank=local, source=source, master_addr=addr,
                           master_port=port, num_nodes=num_nodes, node_rank=node_rank)
    return DistEnv()
