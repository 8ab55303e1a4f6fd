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

:func:`load_checkpoint` checks the manifest (every file present, sizes and checksums equal),
reads the payload with ``torch.load(weights_only=True)``, checks the keys the manifest requires
and that the model weights are finite, and compares the saved config with the running one. Every
failure is a :class:`CheckpointError` naming the path and the cause; damage (anything but a
config mismatch) is a :class:`DamagedCheckpointError`, which ``checkpoint.resume=auto`` skips.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, Iterable, Mapping

import torch

from .checkpoint_load import (_NAME, FORMAT, MANIFEST, PAYLOAD, CheckpointError, DamagedCheckpointError, config_diff,
                              describe_file, load_checkpoint, read_manifest, verify_checkpoint)

__all__ = ["CheckpointError", "DamagedCheckpointError", "save_checkpoint", "begin_checkpoint", "write_file",
           "describe_file", "commit_checkpoint", "staging_dir", "step_dir", "list_checkpoints", "latest_checkpoint",
           "read_manifest", "verify_checkpoint", "load_checkpoint", "config_diff", "MANIFEST", "PAYLOAD", "FORMAT"]

def step_dir(directory: str, step: int) -> str:
    """The final directory of the checkpoint at global step ``step``."""
    return os.path.join(directory, f"step_{step:09d}")


def staging_dir(directory: str, step: int) -> str:
    """Where the checkpoint at ``step`` is assembled (the same path on every rank)."""
    return os.path.join(directory, f".step_{step:09d}.partial")


def list_checkpoints(directory: str) -> list[str]:
    """Committed step directories in ``directory``, oldest step first (staging directories are ignored)."""
    if not os.path.isdir(directory):
        return []
    found = sorted((int(m.group(1)), m.group(0)) for m in map(_NAME.match, os.listdir(directory)) if m)
    return [os.path.join(directory, name) for _, name in found]


def latest_checkpoint(directory: str) -> str | None:
    """The newest committed checkpoint directory in ``directory``, or ``None``."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


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
    """A file object that hashes and counts what passes through (no second read of the file)."""

    def __init__(self, fh) -> None:
        self.fh, self.sha, self.size = fh, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.fh.write(data)

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
    """``torch.save(obj)`` as ``staging/name``, flushed and ``fsync``-ed; returns its manifest record."""
    with open(os.path.join(staging, name), "wb") as fh:
        writer = _HashingWriter(fh)
        torch.save(obj, writer)
        fh.flush()
        os.fsync(fh.fileno())
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
    with open(os.path.join(staging, MANIFEST), "w") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
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


