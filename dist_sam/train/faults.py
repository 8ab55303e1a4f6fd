"""Faults every rank must see alike: a failed checkpoint write, a collective that timed out, a
storm of non-finite steps.

A rank whose write fails must not leave the others waiting in the next collective (the job would
hang until the collective timeout, or forever for a rank blocked in a barrier). Every write is
followed by :func:`agree_on_write`, one ``all_gather_object`` of each rank's failure (``None``
when its write went well) in place of the barrier that followed it anyway, so every rank raises the
same :class:`~dist_sam.checkpoint.CheckpointWriteError` right after the write.

A collective that waits longer than ``run.collective_timeout_s`` for a peer (stopped, hung, on a
dead node) fails in the waiting ranks (gloo: a ``RuntimeError`` "Timed out waiting ...ms"; NCCL:
its watchdog); one whose peer died fails at once ("Connection reset by peer").
:func:`collective_error` turns either into a :class:`CollectiveError` naming the step and, where it
is knowable (world size 2), the rank that did not answer.

Exit statuses (``launch/train.py``), each distinct from the preemption's 75, which
``launch/slurm.sbatch`` requeues: :data:`CHECKPOINT_WRITE_EXIT` (74, ``EX_IOERR``),
:data:`COLLECTIVE_EXIT` (69, ``EX_UNAVAILABLE``: a peer stopped answering) and
:data:`NONFINITE_EXIT` (65, ``EX_DATAERR``: ``run.max_skipped_steps`` non-finite steps in a row).
"""

from __future__ import annotations

import errno
import re
from typing import Any, Callable

import torch.distributed as dist

from ..checkpoint import CheckpointWriteError

__all__ = ["CHECKPOINT_WRITE_EXIT", "COLLECTIVE_EXIT", "NONFINITE_EXIT", "WriteFailure", "write_failure",
           "attempt_write", "agree_on_write", "CollectiveError", "NonFiniteError", "collective_error", "exit_status"]

CHECKPOINT_WRITE_EXIT = 74
COLLECTIVE_EXIT = 69
NONFINITE_EXIT = 65

#: ``(rank, path, cause)`` of a failed write, small and picklable (it crosses the process group).
WriteFailure = tuple[int, str, str]


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _os_error(err: BaseException, rank: int) -> tuple[int, OSError | None]:
    """The OS error behind ``err`` (itself, its cause or context, or a rank's wrapped DCP failure)
    and the rank it happened on."""
    seen: set[int] = set()
    stack = [(rank, err)]
    while stack:
        where, e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return where, e
        stack += [(where, e.__cause__), (where, e.__context__)]
        stack += [(r, pair[0]) for r, pair in getattr(e, "failures", {}).items()]  # DCP's CheckpointException
    return rank, None


def write_failure(err: BaseException, path: str) -> WriteFailure:
    """The failure record: the rank, the file the OS named (else ``path``) and the OS error."""
    rank, found = _os_error(err, _rank())
    if found is None:
        return rank, path, f"{type(err).__name__}: {str(err).strip()[:300]}"
    code = errno.errorcode.get(found.errno, "") if found.errno else ""
    cause = f"{code} [Errno {found.errno}] {found.strerror}" if found.errno else f"{type(found).__name__}: {found}"
    return rank, str(found.filename or path), cause


def attempt_write(write: Callable[[], Any], path: str) -> tuple[Any, WriteFailure | None]:
    """Run ``write``; ``(its result, None)``, or ``(None, failure)`` if it raised an OS error.

    DCP raises its ``CheckpointException`` (a ``BaseException``) on every rank when one rank's
    write failed; it is caught here too, with the OS error it wraps.
    """
    try:
        return write(), None
    except Exception as err:  # noqa: BLE001 -- any failed write stops the job, named, on every rank
        return None, write_failure(err, path)
    except BaseException as err:  # DCP's CheckpointException; KeyboardInterrupt and the like go on
        if type(err).__name__ != "CheckpointException":
            raise
        return None, write_failure(err, path)


def agree_on_write(failure: WriteFailure | None, step: int, what: str | None = None) -> None:
    """Every rank's write outcome, exchanged (a collective: call on all ranks, in place of a barrier).

    Raises:
        CheckpointWriteError: on every rank alike, naming the first failing rank, its path and OS error.
    """
    failures = [failure]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        failures = [None] * dist.get_world_size()
        dist.all_gather_object(failures, failure)
    found = [f for f in failures if f is not None]
    if found:
        rank, path, cause = found[0]
        many = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        raise CheckpointWriteError(path, step, cause, rank if many else None, what)


class CollectiveError(RuntimeError):
    """A collective timed out, or lost a peer, at ``step``; every waiting rank raises it."""

    def __init__(self, message: str, step: int, timed_out: bool, peer: int | None) -> None:
        self.step, self.timed_out, self.peer = step, timed_out, peer
        super().__init__(message)


class NonFiniteError(RuntimeError):
    """``run.max_skipped_steps`` steps in a row were non-finite (and skipped)."""


_TIMEOUT = re.compile(r"timed out|timeout|watchdog", re.IGNORECASE)
_PEER_LOST = re.compile(r"connection (reset|closed|refused)|broken pipe|read error|pair closure|peer|"
                        r"communicator was aborted", re.IGNORECASE)


def collective_error(err: BaseException, step: int, where: str, timeout_s: float) -> CollectiveError | None:
    """``err`` as a :class:`CollectiveError` if a collective raised it, else ``None`` (re-raise ``err``).

    Args:
        err: what the step loop caught.
        step: the global step in flight (or just finished, per ``where``).
        where: ``"during"`` or ``"after"`` that step.
        timeout_s: ``run.collective_timeout_s``, for the message.
    """
    if isinstance(err, (CheckpointWriteError, CollectiveError, NonFiniteError)):
        return None  # named already
    text = str(err)
    timed_out = bool(_TIMEOUT.search(text))
    distributed = isinstance(err, getattr(dist, "DistError", ())) or timed_out or bool(_PEER_LOST.search(text))
    if not isinstance(err, RuntimeError) or not distributed or not dist.is_initialized():
        return None
    rank, size = dist.get_rank(), dist.get_world_size()
    peer = 1 - rank if size == 2 else None
    who = f"rank {peer} did not answer" if peer is not None else f"gloo/NCCL does not say which of the {size} ranks"
    what = (f"a collective timed out after run.collective_timeout_s={timeout_s:g} s" if timed_out
            else "a collective lost its peer (it closed the connection: died or was killed)")
    first = text.strip().splitlines()[0][:300] if text.strip() else type(err).__name__
    return CollectiveError(f"{what} {where} global step {step}; {who} ({first})", step, timed_out, peer)


def exit_status(err: BaseException) -> int:
    """The process exit status for a fault (module docstring)."""
    if isinstance(err, CheckpointWriteError):
        return CHECKPOINT_WRITE_EXIT
    if isinstance(err, CollectiveError):
        return COLLECTIVE_EXIT
    if isinstance(err, NonFiniteError):
        return NONFINITE_EXIT
    raise TypeError(f"no exit status for {type(err).__name__}")
