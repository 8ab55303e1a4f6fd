"""Process-group plumbing: rank discovery, collectives, DDP and DeepSpeed glue.

Nothing here is imported by the SAM rules themselves. DeepSpeed and mpi4py are imported lazily.
"""

from .collectives import all_reduce_mean_, all_reduce_sum_, barrier, is_primary, rank, world_size
from .ddp import CommCounter, check_model, is_ddp, no_grad_sync, unwrap
from .env import DistEnv, discover
from .launch import init_distributed, mpi_bootstrap

__all__ = [
    "DistEnv",
    "discover",
    "init_distributed",
    "mpi_bootstrap",
    "world_size",
    "rank",
    "is_primary",
    "barrier",
    "all_reduce_mean_",
    "all_reduce_sum_",
    "CommCounter",
    "check_model",
    "is_ddp",
    "no_grad_sync",
    "unwrap",
]
