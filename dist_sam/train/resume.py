"""Which checkpoint a run resumes from, decided by all ranks together.

``checkpoint.resume=auto`` tries rank 0's list of step directories, newest first. Every rank loads
the candidate (:func:`dist_sam.checkpoint.load_checkpoint`: manifest sizes and checksums, the
payload, required keys, finite weights, the config); the outcomes are gathered, and the candidate
is taken only if it loaded on every rank. A damaged one is skipped on every rank alike, with a
warning naming its path and the cause; the newest one that loads is named in the log. A config
mismatch is never skipped (an older checkpoint has the same config): it is refused. If checkpoints
exist but none loads, the run refuses to start rather than silently training from scratch.
An explicit ``checkpoint.resume=<dir>`` must load, or every rank raises the same ``CheckpointError``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch.distributed as dist

from ..checkpoint import CheckpointError, DamagedCheckpointError, list_checkpoints, load_checkpoint
from .config import RESUME_MAY_DIFFER, TrainConfig, to_dict

__all__ = ["find_checkpoint"]

log = logging.getLogger("dist_sam.train")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _from_rank0(obj: Any) -> Any:
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj: Any) -> list[Any]:
    if not _distributed():
        return [obj]
    objs: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


def _attempt(path: str, cfg: TrainConfig) -> tuple[dict | None, tuple[str, str, str] | None]:
    """Load on this rank; on failure ``(kind, path, reason)`` with kind ``damaged`` or ``refused``."""
    try:
        return load_checkpoint(path, config=to_dict(cfg), ignore=RESUME_MAY_DIFFER), None
    except DamagedCheckpointError as err:
        return None, ("damaged", err.path, err.reason)
    except CheckpointError as err:
        return None, ("refused", err.path, str(err).split(": ", 1)[-1])


def _collective_load(path: str, cfg: TrainConfig) -> tuple[dict | None, list[tuple[int, tuple]]]:
    """Load ``path`` on every rank; the failures of all ranks, as ``[(rank, (kind, path, reason))]``."""
    state, failure = _attempt(path, cfg)
    failures = [(rank, f) for rank, f in enumerate(_gather(failure)) if f is not None]
    return (state if not failures else None), failures


def _describe(failures: list[tuple[int, tuple]]) -> str:
    rank, (_, path, reason) = failures[0]
    where = f" (on rank {rank})" if _distributed() else ""
    return f"{path}: {reason}{where}"


def _explicit(path: str, cfg: TrainConfig) -> tuple[str, dict]:
    if os.path.isfile(path):  # the payload or the manifest named instead of the step directory
        path = os.path.dirname(path)
    state, failures = _collective_load(path, cfg)
    if failures:
        _, (kind, where, reason) = failures[0]
        rank = f" (on rank {failures[0][0]})" if _distributed() else ""
        raise CheckpointError(where, reason + rank, "checkpoint.resume names it explicitly; use 'auto' to fall "
                              "back to the newest checkpoint that loads" if kind == "damaged" else "")
    return path, state


def _auto(cfg: TrainConfig) -> tuple[str | None, dict | None]:
    candidates = _from_rank0(list_checkpoints(cfg.checkpoint_dir)[::-1])
    skipped = []
    for path in candidates:
        state, failures = _collective_load(path, cfg)
        if not failures:
            if skipped:
                log.warning("resuming from %s, the newest checkpoint that loads (skipped %d damaged)", path, len(skipped))
            return path, state
        refused = [f for f in failures if f[1][0] == "refused"]
        if refused:
            _, (_, where, reason) = refused[0]
            raise CheckpointError(where, reason)
        skipped.append(_describe(failures))
        log.warning("skipping damaged checkpoint %s", skipped[-1])
    if candidates:
        raise CheckpointError(cfg.checkpoint_dir, f"none of the {len(candidates)} checkpoint(s) loads: "
                              + "; ".join(skipped), "restore one, or set checkpoint.resume=never to start over")
    return None, None


def find_checkpoint(cfg: TrainConfig) -> tuple[str | None, dict | None]:
    """``(path, state)`` of the checkpoint to resume from, the same on every rank, or ``(None, None)``.

    A collective when several processes run. Raises ``CheckpointError`` naming the file and the cause.
    """
    choice = cfg.checkpoint.resume
    if choice == "never":
        return None, None
    if choice == "auto":
        return _auto(cfg)
    return _explicit(choice, cfg)
