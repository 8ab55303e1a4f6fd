"""Atomic, rank-0, keep-last-K checkpoints that load with ``torch.load(weights_only=True)``.

A checkpoint is one file ``<dir>/ckpt_<step:09d>.pt`` holding a plain dict of tensors and Python
containers (no pickled objects), so it loads with ``weights_only=True``. Writing goes to a temporary
file in the same directory, is flushed and ``fsync``-ed, then renamed over the final name (atomic
on POSIX) and the directory is ``fsync``-ed: a process killed mid-write leaves at most a stray
``.tmp`` file, never a truncated checkpoint, and the previous checkpoint stays loadable.

Loading refuses (``CheckpointError``) a file whose model weights are not finite, or whose saved
config differs from the running one in a key that affects the result.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from typing import Any, Iterable, Mapping

import torch

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "list_checkpoints", "latest_checkpoint", "config_diff"]

_NAME = re.compile(r"^ckpt_(\d{9})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that must not be resumed from (non-finite weights, another config)."""


def _path(directory: str, step: int) -> str:
    return os.path.join(directory, f"ckpt_{step:09d}.pt")


def list_checkpoints(directory: str) -> list[str]:
    """Finished checkpoints in ``directory``, oldest step first (``.tmp`` files are ignored)."""
    if not os.path.isdir(directory):
        return []
    found = sorted((int(m.group(1)), m.group(0)) for m in map(_NAME.match, os.listdir(directory)) if m)
    return [os.path.join(directory, name) for _, name in found]


def latest_checkpoint(directory: str) -> str | None:
    """The newest finished checkpoint in ``directory``, or ``None``."""
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


def save_checkpoint(state: Mapping[str, Any], directory: str, *, step: int, keep_last: int = 3) -> str:
    """Write ``state`` atomically as ``ckpt_<step>.pt`` and delete all but the newest ``keep_last``.

    Call on rank 0 only (the caller gathers per-rank state first). Returns the final path.
    """
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"keep_last must be an integer >= 1, got {keep_last!r}")
    os.makedirs(directory, exist_ok=True)
    for stale in (n for n in os.listdir(directory) if n.startswith(".ckpt_") and n.endswith(".tmp")):
        os.unlink(os.path.join(directory, stale))  # left by a writer killed mid-write (one writer: rank 0)
    final = _path(directory, step)
    fd, tmp = tempfile.mkstemp(prefix=f".ckpt_{step:09d}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; a checkpoint is as readable as any output
        with os.fdopen(fd, "wb") as fh:
            torch.save(dict(state), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)
    for old in list_checkpoints(directory)[:-keep_last]:
        os.unlink(old)
    return final


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_diff(saved: Mapping[str, Any], current: Mapping[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """Dotted keys whose values differ between two nested config dicts, as ``key: saved -> current``.

    ``ignore`` holds dotted keys or prefixes ending in ``.*`` (``"checkpoint.*"``).
    """
    skip = tuple(ignore)

    def ignored(key: str) -> bool:
        return any(key == p or (p.endswith(".*") and key.startswith(p[:-1])) for p in skip)

    a, b = _flatten(saved), _flatten(current)
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
            for k in sorted(set(a) | set(b)) if not ignored(k) and a.get(k) != b.get(k)]


def _non_finite(weights: Mapping[str, Any]) -> list[str]:
    bad = []
    for name, value in weights.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad.append(name)
        elif isinstance(value, float) and not math.isfinite(value):
            bad.append(name)
    return bad


def load_checkpoint(
    path: str,
    *,
    config: Mapping[str, Any] | None = None,
    ignore: Iterable[str] = (),
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` and check that it may be resumed from.

    Args:
        path: the checkpoint file.
        config: the running config (a nested dict); compared with the saved ``state["config"]``.
        ignore: config keys allowed to differ (see :func:`config_diff`).
        map_location: where tensors land.

    Raises:
        CheckpointError: ``state["model"]`` holds NaN/inf, or the configs differ.
    """
    state = torch.load(path, map_location=map_location, weights_only=True)
    bad = _non_finite(state.get("model", {}))
    if bad:
        raise CheckpointError(
            f"refusing checkpoint {path}: non-finite values (NaN/inf) in {len(bad)} model tensor(s), "
            f"e.g. {bad[:3]}; resume from an earlier checkpoint instead"
        )
    if config is not None:
        diff = config_diff(state.get("config", {}), config, ignore)
        if diff:
            raise CheckpointError(
                f"refusing checkpoint {path}: it was written with a different config ({len(diff)} key(s) "
                f"differ: {'; '.join(diff[:5])}). Resume with the same config, or start a new run "
                "(another output_dir, or checkpoint.resume=never)"
            )
    return state
