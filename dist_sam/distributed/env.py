"""Rank discovery, in one place: torchrun, then MPI/PMI, then SLURM, else a single process."""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

__all__ = ["DistEnv", "discover"]

# (launcher, rank, world size, local rank) variable names, in order of precedence.
_SOURCES = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("pmi", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("pmix", "PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistEnv:
    """Where this process sits in the job.

    Attributes:
        rank: global rank.
        world_size: number of processes.
        local_rank: rank on this node (selects the GPU).
        source: which launcher's variables were read (``torchrun``, ``openmpi``, ``pmi``, ``pmix``,
            ``slurm`` or ``single``).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    source: str = "single"

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
            return DistEnv(rank=rank, world_size=size, local_rank=local, source=source)
    return DistEnv()
