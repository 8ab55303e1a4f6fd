"""What a checkpoint holds, and putting it back: the whole training state, rank-independent but
for the RNG states, which are gathered to rank 0 as a list indexed by rank.

A restarted job may hand out ranks differently (torchrun after a failure, a new SLURM
allocation); every rank then loads the same file and takes ``rng[its new rank]``.
"""

from __future__ import annotations

import hashlib
import os
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["seed_everything", "rng_state", "set_rng_state", "gather", "weights_digest", "CHECKPOINT_VERSION", "RANK_LOCAL_OPTIMIZER_KEYS"]

CHECKPOINT_VERSION = 1
#: Optimizer state entries that may differ across ranks: RW-SAM calibrates ``mu="auto"`` on each
#: rank's own first batch. They are saved per rank, beside the RNG states.
RANK_LOCAL_OPTIMIZER_KEYS = ("rwsam",)


def seed_everything(seed: int, rank: int, deterministic: bool) -> None:
    """Per-rank Python, numpy and torch seeds; deterministic kernels when asked."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def rng_state() -> dict[str, Any]:
    """This process's torch, CUDA, numpy and Python RNG states, as ``weights_only``-safe values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "internal": list(internal), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, indexed by rank (a collective: call it on all ranks)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    objs: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


def weights_digest(module: torch.nn.Module | dict[str, torch.Tensor]) -> str:
    """SHA-256 of every parameter and buffer (of a module or a state dict), bit for bit: equal
    digests mean equal replicas."""
    digest = hashlib.sha256()
    state = module if isinstance(module, dict) else module.state_dict()
    for name, tensor in state.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
