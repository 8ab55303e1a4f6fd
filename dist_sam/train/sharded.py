"""FSDP2 checkpoints through ``torch.distributed.checkpoint`` (DCP), in the trainer's step directories.

Layout of a step directory written by an FSDP2 run::

    step_000000123/
        state.pt       rank 0: position, schedule, SAM's counters, per-rank RNG and RW-SAM mu
        dcp/           DCP: every rank writes its shards of the model and the base optimizer
        manifest.json  written last by rank 0: size and SHA-256 of every file above

Protocol (a collective): rank 0 creates the staging directory; agreement; every rank writes its DCP
shards (DCP itself gathers the plan and rank 0 writes ``dcp/.metadata``) and describes the files it
wrote; the records and failures are gathered; rank 0 writes ``state.pt`` and commits (manifest,
fsync, rename); agreement. A job killed anywhere before the rename leaves only a ``.partial``
directory. A write that fails on any rank, in any phase, raises the same
:class:`~dist_sam.checkpoint.CheckpointWriteError` on every rank right after that phase (each
agreement is one ``all_gather_object`` of the ranks' failures, :mod:`dist_sam.train.faults`).

Loading goes through DCP, which re-shards to the running world size. Weights that load non-finite
are refused on every rank. :func:`export_model_state` turns either kind of checkpoint into a plain
``state_dict`` (evaluation, DDP fine-tuning) without a process group.
"""

from __future__ import annotations

import glob
import os
import shutil
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemWriter
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from ..checkpoint import (PAYLOAD, CheckpointError, begin_checkpoint, commit_checkpoint, describe_file,
                          injected_fault, staging_dir, verify_checkpoint, write_file)
from .faults import agree_on_write, attempt_write

__all__ = ["DCP_DIR", "save_sharded", "load_sharded", "full_model_state", "export_model_state"]

DCP_DIR = "dcp"


def _gather(obj: Any) -> list[Any]:
    objs: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


class _FaultyFileSystem(FileSystem):
    """Testing aid (:data:`dist_sam.checkpoint.WRITE_FAULT_ENV`): this rank's shard files fail to open."""

    def __init__(self, fault: int, rank: int) -> None:
        super().__init__()
        self.fault, self.prefix = fault, f"__{rank}_"

    def create_stream(self, path, mode):
        if "w" in mode and os.path.basename(str(path)).startswith(self.prefix):
            raise OSError(self.fault, os.strerror(self.fault), str(path))
        return super().create_stream(path, mode)


def _storage_writer(path: str, rank: int, step: int) -> FileSystemWriter:
    writer = FileSystemWriter(path)
    fault = injected_fault(rank, step)
    if fault is not None:
        writer.fs = _FaultyFileSystem(fault, rank)
    return writer


def _write_shards(model: nn.Module, base_optimizer: torch.optim.Optimizer, staging: str, rank: int,
                  step: int) -> dict[str, Any]:
    """DCP-save this rank's shards into ``staging/dcp``; the manifest records of the files it wrote."""
    model_sd, optim_sd = get_state_dict(model, base_optimizer)
    writer = _storage_writer(os.path.join(staging, DCP_DIR), rank, step)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, storage_writer=writer)
    return {os.path.relpath(f, staging): describe_file(f) for f in glob.glob(os.path.join(staging, DCP_DIR, f"__{rank}_*"))}


def save_sharded(model: nn.Module, base_optimizer: torch.optim.Optimizer, payload: dict[str, Any], directory: str,
                 *, step: int, keep_last: int, meta: dict[str, Any]) -> str | None:
    """Write one sharded checkpoint (call on every rank); rank 0 returns the step directory.

    Raises:
        CheckpointWriteError: on every rank alike, when a write failed on any rank.
    """
    rank = dist.get_rank()
    staging = staging_dir(directory, step)
    failure = attempt_write(lambda: begin_checkpoint(directory, step), directory)[1] if rank == 0 else None
    agree_on_write(failure, step)
    mine, failure = attempt_write(lambda: _write_shards(model, base_optimizer, staging, rank, step), staging)
    files: dict[str, Any] = {}
    try:
        gathered = _gather((mine, failure))
        for records, _ in gathered:
            files.update(records or {})
        faults = [fault for _, fault in gathered if fault is not None]
        agree_on_write(faults[0] if faults else None, step)
        path = None
        if rank == 0:
            path, failure = attempt_write(lambda: _commit(staging, directory, step, files, payload, keep_last, meta),
                                          staging)
        agree_on_write(failure, step)
    except BaseException:
        if rank == 0:  # the previous checkpoints stay; the half-written one goes
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _commit(staging: str, directory: str, step: int, files: dict[str, Any], payload: dict[str, Any], keep_last: int,
            meta: dict[str, Any]) -> str:
    meta_file = os.path.join(staging, DCP_DIR, ".metadata")
    files[os.path.relpath(meta_file, staging)] = describe_file(meta_file)
    files[PAYLOAD] = write_file(staging, PAYLOAD, payload)
    return commit_checkpoint(staging, directory, step, files, required=list(payload), meta=meta, keep_last=keep_last)


def load_sharded(model: nn.Module, base_optimizer: torch.optim.Optimizer, path: str) -> None:
    """Load the model and base-optimizer shards of the step directory ``path`` (every rank).

    Raises:
        CheckpointError: on every rank alike, if DCP fails or a loaded weight is not finite.
    """
    model_sd, optim_sd = get_state_dict(model, base_optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    error = None
    try:
        dcp.load(state, checkpoint_id=os.path.join(path, DCP_DIR))
    except Exception as err:  # noqa: BLE001 -- DCP raises many kinds; the user gets one message
        error = f"torch.distributed.checkpoint could not load it ({type(err).__name__}: {str(err)[:300]})"
    if error is None:
        local = [t.to_local() if hasattr(t, "to_local") else t for t in state["model"].values()
                 if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not all(bool(torch.isfinite(t).all()) for t in local):
            error = "non-finite values (NaN/inf) in the model weights"
    errors = [e for e in _gather(error) if e is not None]
    if errors:
        raise CheckpointError(path, errors[0])
    set_state_dict(model, base_optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) model state dict on CPU, on every rank (a collective)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))


def export_model_state(path: str) -> dict[str, torch.Tensor]:
    """A checkpoint's model weights as one plain ``state_dict``, from a DDP or an FSDP2 step directory.

    Verifies the manifest first (sizes and checksums). Needs no process group.

    Raises:
        CheckpointError: the checkpoint is damaged or holds no model.
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    manifest = verify_checkpoint(path)
    sharded = os.path.isdir(os.path.join(path, DCP_DIR))
    if not sharded:
        state = torch.load(os.path.join(path, manifest["payload"]), map_location="cpu", weights_only=True)
        if "model" not in state:
            raise CheckpointError(path, "its payload holds no 'model' state dict")
        return state["model"]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "full.pt")
        dcp_to_torch_save(os.path.join(path, DCP_DIR), out)
        full = torch.load(out, map_location="cpu", weights_only=False)
    return {k: v for k, v in full["model"].items() if isinstance(v, torch.Tensor)}
