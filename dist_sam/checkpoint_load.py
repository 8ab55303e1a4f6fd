"""Checkpoints read back: the layout's names, the manifest check, the payload, finite weights, the config.

The write side is :mod:`dist_sam.checkpoint`, which re-exports everything here (``from
dist_sam.checkpoint import load_checkpoint`` is the public path; its docstring has the layout).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from typing import Any, Iterable, Mapping

import torch

__all__ = ["CheckpointError", "DamagedCheckpointError", "step_dir", "staging_dir", "list_checkpoints",
           "latest_checkpoint", "describe_file", "read_manifest", "verify_checkpoint", "load_checkpoint", "config_diff",
           "MANIFEST", "PAYLOAD", "FORMAT"]

MANIFEST = "manifest.json"
PAYLOAD = "state.pt"
FORMAT = "dist-sam-checkpoint/2"
_NAME = re.compile(r"^step_(\d{9})$")
_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint that must not be resumed from; the message names the path and the cause."""

    def __init__(self, path: str, reason: str, advice: str = "") -> None:
        self.path, self.reason = path, reason
        super().__init__(f"checkpoint {path}: {reason}" + (f"; {advice}" if advice else ""))


class DamagedCheckpointError(CheckpointError):
    """The checkpoint cannot be read as written: missing, truncated, altered, incomplete or non-finite."""


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


def describe_file(path: str) -> dict[str, Any]:
    """The manifest record (size, SHA-256) of a file another writer produced."""
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": sha.hexdigest()}



def read_manifest(path: str) -> dict[str, Any]:
    """The manifest of the checkpoint directory ``path``.

    Raises:
        DamagedCheckpointError: no manifest, unreadable, not JSON, or another format.
    """
    file = os.path.join(path, MANIFEST)
    try:
        with open(file) as fh:
            manifest = json.load(fh)
    except FileNotFoundError:
        raise DamagedCheckpointError(path, f"no {MANIFEST} (not a finished dist-sam checkpoint)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedCheckpointError(path, f"{MANIFEST} is unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DamagedCheckpointError(path, f"{MANIFEST} is not a {FORMAT} manifest (format {found!r})")
    return manifest


def verify_checkpoint(path: str) -> dict[str, Any]:
    """Check that every file the manifest lists is present with its recorded size and SHA-256.

    Returns:
        The manifest.

    Raises:
        DamagedCheckpointError: naming the first file that is missing, of another size, or altered.
    """
    manifest = read_manifest(path)
    for name, record in manifest["files"].items():
        file = os.path.join(path, name)
        try:
            size = os.path.getsize(file)
        except OSError:
            raise DamagedCheckpointError(file, "missing (listed in the manifest)") from None
        if size != record.get("bytes"):
            raise DamagedCheckpointError(file, f"size {size} bytes, but {record.get('bytes')} were written (truncated?)")
        try:
            found = describe_file(file)["sha256"]
        except OSError as err:
            raise DamagedCheckpointError(file, f"unreadable ({err})") from None
        if found != record.get("sha256"):
            raise DamagedCheckpointError(file, "SHA-256 differs from the one recorded when it was written (altered)")
    return manifest


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


def _non_finite(weights: Any) -> list[str]:
    if not isinstance(weights, Mapping):
        return []
    return [name for name, value in _flatten(weights).items()
            if (isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()))
            or (isinstance(value, float) and not math.isfinite(value))]


def _read_payload(path: str, manifest: Mapping[str, Any], map_location) -> dict[str, Any]:
    name = manifest.get("payload")
    if not name:
        raise DamagedCheckpointError(path, f"the manifest names no {PAYLOAD} payload (engine "
                                           f"{manifest.get('meta', {}).get('engine')!r}); load it with that engine")
    file = os.path.join(path, name)
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 -- torch.load fails in many ways; the user gets one message
        cause = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DamagedCheckpointError(file, f"torch.load failed ({type(err).__name__}: {cause[:300]})") from None
    if not isinstance(state, dict):
        raise DamagedCheckpointError(file, f"holds a {type(state).__name__}, not a state dict")
    return state


def load_checkpoint(path: str, *, config: Mapping[str, Any] | None = None, ignore: Iterable[str] = (),
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify and load a checkpoint directory; check that it may be resumed from.

    Args:
        path: the step directory.
        config: the running config (a nested dict); compared with the saved ``state["config"]``.
        ignore: config keys allowed to differ (see :func:`config_diff`).
        map_location: where tensors land.

    Raises:
        DamagedCheckpointError: a manifest check fails, ``torch.load`` fails, a key the manifest
            requires is missing, or the model weights hold NaN/inf.
        CheckpointError: the configs differ.
    """
    manifest = verify_checkpoint(path)
    state = _read_payload(path, manifest, map_location)
    file = os.path.join(path, manifest["payload"])
    missing = [k for k in manifest["verify"].get("required", []) if k not in state]
    if missing:
        raise DamagedCheckpointError(file, f"missing key(s) {missing} that the manifest requires")
    for key in manifest["verify"].get("finite", []):
        bad = _non_finite(state.get(key))
        if bad:
            raise DamagedCheckpointError(file, f"non-finite values (NaN/inf) in {len(bad)} {key} tensor(s), e.g. {bad[:3]}")
    if config is not None:
        diff = config_diff(state.get("config", {}), config, ignore)
        if diff:
            raise CheckpointError(path, f"it was written with a different config ({len(diff)} key(s) differ: "
                                  f"{'; '.join(diff[:5])})", "resume with the same config, or start a new run "
                                  "(another output_dir, or checkpoint.resume=never)")
    return state
