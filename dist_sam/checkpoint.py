"""Checkpoints as step directories with a manifest, written atomically, verified on load.

Layout (one directory per checkpoint, whatever the engine)::

    <dir>/step_000000123/
        state.pt         the payload (DDP: rank 0's whole training state; torch.save, weights_only-safe)
        manifest.json    written last: every file's size and SHA-256, what the loader must check

A checkpoint is assembled in a staging directory ``<dir>/.step_000000123.partial`` (a name every
rank can compute, so several writers -- e.g. torch.distributed.checkpoint, where every rank writes
its shard -- can fill it), then one process writes the manifest, ``fsync``-s and renames the
staging directory to its final name. A process killed mid-write leaves a ``.partial`` directory
that no reader looks at and the next writer removes; the previous checkpoints stay loadable. The
newest ``keep_last`` step directories are kept.

The collective part (who writes what, barriers) is the caller's: this module never talks to other
processes. A single writer calls :func:`save_checkpoint`; several writers call
:func:`begin_checkpoint` (one process, then a barrier), :func:`write_file` or :func:`describe_file`
(each writer), then :func:`commit_checkpoint` (one process, with every writer's file records).
A failed write raises the OS's ``OSError`` (also where ``torch.save`` would wrap it); the trainer
turns it into a :class:`CheckpointWriteError` on every rank (:mod:`dist_sam.train.saving`).

The read side is :mod:`dist_sam.checkpoint_load`, re-exported here: :func:`load_checkpoint` checks the manifest (every file present, sizes and checksums equal),
reads the payload with ``torch.load(weights_only=True)``, checks the keys the manifest requires
and that the model weights are finite, and compares the saved config with the running one. Every
failure is a :class:`CheckpointError` naming the path and the cause; damage (anything but a
config mismatch) is a :class:`DamagedCheckpointError`, which ``checkpoint.resume=auto`` skips.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from typing import Any, Iterable, Mapping

import torch

from .checkpoint_load import (FORMAT, MANIFEST, PAYLOAD, CheckpointError, DamagedCheckpointError, config_diff,
                              describe_file, latest_checkpoint, list_checkpoints, load_checkpoint, read_manifest,
                              staging_dir, step_dir, verify_checkpoint)

__all__ = ["CheckpointError", "DamagedCheckpointError", "CheckpointWriteError", "save_checkpoint", "begin_checkpoint",
           "write_file", "describe_file", "commit_checkpoint", "staging_dir", "step_dir", "list_checkpoints",
           "latest_checkpoint", "read_manifest", "verify_checkpoint", "load_checkpoint", "config_diff",
           "injected_fault", "MANIFEST", "PAYLOAD", "FORMAT", "WRITE_FAULT_ENV"]


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (disk full, file too large, no permission, I/O error...).

    Attributes:
        path: the file or directory the failing write was for.
        step: the global step of the checkpoint.
        rank: the rank whose write failed (``None`` for one process).
        cause: the OS error, as text (``[Errno 28] No space left on device``).
    """

    def __init__(self, path: str, step: int, cause: str, rank: int | None = None, what: str | None = None) -> None:
        self.path, self.step, self.cause, self.rank = path, step, cause, rank
        where = f" on rank {rank}" if rank is not None else ""
        super().__init__(f"writing {what or f'the checkpoint of step {step}'} failed{where}: {path}: {cause}; the "
                         "previous checkpoints are intact and the next run resumes from the newest of them")


#: Testing aid, first attempt only: ``"RANK:ERRNO:STEP"`` (``"0:ENOSPC:4"``) makes the checkpoint
#: file writes of that rank fail with that OS error from global step STEP on, as a full disk would.
WRITE_FAULT_ENV = "DIST_SAM_CHECKPOINT_FAULT"


def injected_fault(rank: int, step: int) -> int | None:
    """The errno :data:`WRITE_FAULT_ENV` injects into ``rank``'s checkpoint writes at ``step``, or ``None``."""
    spec = os.environ.get(WRITE_FAULT_ENV, "").split(":")
    if len(spec) != 3 or spec[0] != str(rank) or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    return getattr(errno, spec[1]) if step >= int(spec[2]) else None


def _fault(staging: str) -> int | None:
    """:func:`injected_fault` for a file written into ``staging`` (its name holds the step)."""
    found = re.fullmatch(r"\.step_(\d+)\.partial", os.path.basename(staging))
    return injected_fault(int(os.environ.get("RANK", "0")), int(found.group(1))) if found else None


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingWriter:
    """A file object that hashes and counts what passes through (no second read of the file).

    It keeps the first ``OSError`` of the file: ``torch.save`` may report a failed write as its
    own ``RuntimeError``, and the caller wants the OS's cause.
    """

    def __init__(self, fh, fault: int | None = None) -> None:
        self.fh, self.sha, self.size, self.fault = fh, hashlib.sha256(), 0, fault
        self.error: OSError | None = None

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        try:
            if self.fault is not None:
                raise OSError(self.fault, os.strerror(self.fault), self.fh.name)
            return self.fh.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.fh.flush()


def begin_checkpoint(directory: str, step: int) -> str:
    """Create an empty staging directory for ``step`` (one process; the others wait for it)."""
    os.makedirs(directory, exist_ok=True)
    for stale in (n for n in os.listdir(directory) if n.startswith(".step_") and n.endswith(".partial")):
        shutil.rmtree(os.path.join(directory, stale), ignore_errors=True)  # left by a writer killed mid-write
    path = staging_dir(directory, step)
    os.makedirs(path)
    return path


def write_file(staging: str, name: str, obj: Any) -> dict[str, Any]:
    """``torch.save(obj)`` as ``staging/name``, flushed and ``fsync``-ed; returns its manifest record.

    Raises:
        OSError: the write failed (the OS's error, even where ``torch.save`` wraps it).
    """
    file = os.path.join(staging, name)
    try:
        with open(file, "wb") as fh:
            writer = _HashingWriter(fh, _fault(staging))
            try:
                torch.save(obj, writer)
            except Exception as err:  # noqa: BLE001 -- torch.save's own error for a failed write hides the OS's
                # Taken out of the writer: torch.save's C++ file writer holds ``writer.write``, and the
                # error's traceback holds that writer, a cycle the garbage collector cannot see. Left,
                # it kept the trainer, its DDP model and the process group alive to the interpreter's
                # finalization, whose gloo teardown then aborted the failing rank (SIGABRT, not 74).
                error, writer.error = writer.error, None
                if error is not None and error is not err:
                    raise error from err
                raise
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:  # a failed write(), flush or close names no file: name it
        if err.filename:
            raise
        raise OSError(err.errno, err.strerror, file) from err
    return {"bytes": writer.size, "sha256": writer.sha.hexdigest()}


def commit_checkpoint(staging: str, directory: str, step: int, files: Mapping[str, Mapping[str, Any]], *,
                      required: Iterable[str] = (), finite: Iterable[str] = (), meta: Mapping[str, Any] | None = None,
                      keep_last: int = 3) -> str:
    """Write the manifest last, rename ``staging`` to the step directory, keep the newest ``keep_last``.

    Args:
        staging: from :func:`begin_checkpoint`, holding every file of ``files``.
        directory: the checkpoint directory.
        step: the global step.
        files: ``{relative name: record}`` from :func:`write_file` / :func:`describe_file`.
        required: top-level keys the payload must hold.
        finite: top-level payload keys (state dicts) whose floating-point tensors must be finite.
        meta: JSON-safe facts for readers (engine, world size, batch plan...).
        keep_last: step directories to keep (>= 1).

    Returns:
        The final step directory.
    """
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"keep_last must be an integer >= 1, got {keep_last!r}")
    manifest = {"format": FORMAT, "step": step, "payload": PAYLOAD if PAYLOAD in files else None,
                "files": {name: dict(rec) for name, rec in files.items()},
                "verify": {"required": list(required), "finite": list(finite)}, "meta": dict(meta or {})}
    file = os.path.join(staging, MANIFEST)
    try:
        with open(file, "w") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:  # as in write_file: name the file the OS did not
        raise err if err.filename else OSError(err.errno, err.strerror, file) from err
    _fsync_dir(staging)
    final = step_dir(directory, step)
    if os.path.exists(final):  # the same step saved again (mid-epoch, then at the epoch's end)
        old = f"{staging}.old"
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    _fsync_dir(directory)
    for stale in list_checkpoints(directory)[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def save_checkpoint(state: Mapping[str, Any], directory: str, *, step: int, keep_last: int = 3,
                    required: Iterable[str] = (), finite: Iterable[str] = ("model",),
                    meta: Mapping[str, Any] | None = None) -> str:
    """One writer: ``state`` as ``step_<step>/state.pt`` plus its manifest, atomically; returns the directory."""
    staging = begin_checkpoint(directory, step)
    try:
        record = write_file(staging, PAYLOAD, dict(state))
        return commit_checkpoint(staging, directory, step, {PAYLOAD: record}, required=required or list(state),
                                 finite=[k for k in finite if k in state], meta=meta, keep_last=keep_last)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
