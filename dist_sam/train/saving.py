"""The trainer's checkpoint side: what a checkpoint holds, writing it, putting it back.

Everything but ``per_rank`` is the same on every rank; ``per_rank`` (the RNG states and RW-SAM's
calibrated ``mu``) is gathered to rank 0 as a list indexed by rank. A resumed rank takes the entry
of its *current* rank (torchrun and SLURM may reassign ranks), or, after a change of world size
(:mod:`dist_sam.train.plan`), for each ascent group it now reads RW-SAM's ``mu`` calibrated by the
saved rank that read that group (``RWSAM.group_mu`` when they differ), and the RNG state of its own
rank number where that rank existed (a fresh seed otherwise).

The DDP writer is :func:`dist_sam.checkpoint.save_checkpoint` on rank 0 followed by an agreement
(:func:`dist_sam.train.faults.agree_on_write`, in place of a barrier), so no rank goes on (or
exits, on preemption) before the step directory is committed, and a failed write stops every rank
with the same :class:`~dist_sam.checkpoint.CheckpointWriteError` (exit 74). A sharded writer
(torch.distributed.checkpoint) fits the same shape: rank 0 ``begin_checkpoint``, agreement, every
rank writes its files and reports their records, rank 0 ``commit_checkpoint``, agreement.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..checkpoint import CheckpointError, save_checkpoint
from .config import to_dict
from ..optim.rwsam import RWSAM
from .faults import NonFiniteError, agree_on_write, attempt_write
from .plan import BatchPlan, source_rank
from .state import CHECKPOINT_VERSION, RANK_LOCAL_OPTIMIZER_KEYS, gather, rng_state, set_rng_state

__all__ = ["CheckpointMixin"]

log = logging.getLogger("dist_sam.train")


class CheckpointMixin:
    """Saving and resuming for :class:`dist_sam.train.loop.Trainer` (which sets the attributes used here)."""

    def rank_state(self) -> dict[str, Any]:
        """What differs between ranks: the RNG states, RW-SAM's per-rank calibrated ``mu`` and, under
        FSDP2, LookSAM's ``g_v`` (kept in the gradient's shards)."""
        optimizer = self.optimizer.state_dict()
        keys = RANK_LOCAL_OPTIMIZER_KEYS + (("looksam",) if self.sharded else ())
        return {"rng": rng_state(), "optimizer": {k: optimizer[k] for k in keys if k in optimizer}}

    def position(self) -> dict[str, Any]:
        """Where training stands (rank-independent): epoch, step, data position, batch plan, eval history."""
        return {"version": CHECKPOINT_VERSION, "config": to_dict(self.cfg), "world_size": self.env.world_size,
                "plan": self.plan.to_dict(), "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step,
                "data": {"epoch": self.epoch, "step": self.step_in_epoch},  # the loaders resume exactly there
                "history": self.history}

    def state_dict(self, per_rank: list[dict[str, Any]]) -> dict[str, Any]:
        """The whole training state; all but ``per_rank`` (indexed by rank) is the same on every rank."""
        return {**self.position(), "model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None, "per_rank": per_rank}

    @property
    def sharded(self) -> bool:
        """FSDP2: the model and optimizer are saved and loaded through torch.distributed.checkpoint."""
        return self.cfg.model.parallel == "fsdp"

    def sharded_payload(self, per_rank: list[dict[str, Any]]) -> dict[str, Any]:
        """Rank 0's part of an FSDP2 checkpoint: everything but the model and base-optimizer shards."""
        optimizer = {k: v for k, v in self.optimizer.state_dict().items()
                     if k not in ("state", "param_groups", "looksam")}  # LookSAM's shards: per rank
        return {**self.position(), "optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                "scaler": None, "per_rank": per_rank}

    def weights_finite(self) -> bool:
        """Whether this rank's weights (its shards under FSDP2) are all finite."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.module.parameters()]
        return all(bool(torch.isfinite(p).all()) for p in local if p.is_floating_point())

    def save(self) -> None:
        """Gather the per-rank state; rank 0 writes the step directory; everyone waits (a collective).

        Raises:
            NonFiniteError: on every rank, writing nothing, if any rank's weights are not finite.
            CheckpointWriteError: on every rank, if a write failed on any rank.
        """
        with self.timer("checkpoint"):
            per_rank, finite = map(list, zip(*gather((self.rank_state(), self.weights_finite()))))
            if not all(finite):  # the last checkpoint stays the newest: it holds finite weights
                raise NonFiniteError(f"refusing to checkpoint step {self.global_step}: non-finite weights on "
                                     f"rank(s) {[r for r, ok in enumerate(finite) if not ok]}")
            if self.sharded:
                from .sharded import save_sharded

                save_sharded(self.model, self.optimizer.base_optimizer, self.sharded_payload(per_rank),
                             self.cfg.checkpoint_dir, step=self.global_step, keep_last=self.cfg.checkpoint.keep_last,
                             meta={"engine": "fsdp", "world_size": self.env.world_size, "plan": self.plan.to_dict(),
                                   "global_step": self.global_step})
            else:
                failure = None
                if self.primary:
                    meta = {"engine": "ddp", "world_size": self.env.world_size, "plan": self.plan.to_dict(),
                            "global_step": self.global_step}
                    path, failure = attempt_write(lambda: save_checkpoint(
                        self.state_dict(per_rank), self.cfg.checkpoint_dir, step=self.global_step,
                        keep_last=self.cfg.checkpoint.keep_last, finite=("model",), meta=meta), self.cfg.checkpoint_dir)
                    log.debug("checkpoint %s", path)
                agree_on_write(failure, self.global_step)  # every rank raises alike, or goes on
        self.saved_at = self.global_step

    def resume(self) -> None:
        """Put back the state :func:`dist_sam.train.resume.find_checkpoint` loaded (in ``__init__``)."""
        state, self._loaded = self._loaded, None
        if state is None:
            return
        saved = BatchPlan.from_dict(state["plan"])
        rank = self.env.rank
        mine = state["per_rank"][rank] if rank < saved.world_size else None  # the *current* rank's entry
        mu_from = state["per_rank"][source_rank(saved, self.plan, rank)]
        if self.sharded:  # the shards through DCP (re-sharded to this world size); SAM's counters from state.pt
            from .sharded import load_sharded

            load_sharded(self.model, self.optimizer.base_optimizer, self.resumed_from)
            merged = {**self.optimizer.state_dict(), **state["optimizer"], **mu_from["optimizer"]}
            if saved.world_size != self.plan.world_size:
                merged.pop("looksam", None)  # its shards do not fit the new sharding: the next look step rebuilds it
            self.optimizer.load_state_dict(merged)
        else:
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict({**state["optimizer"], **mu_from["optimizer"]})
        if saved.world_size != self.plan.world_size:
            self._carry_mu(state, saved)
            self._log_replan(saved, mine is None)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.restore_position(state, mine, self.resumed_from)

    def _carry_mu(self, state: dict[str, Any], saved: BatchPlan, optimizer: Any = None) -> None:
        """RW-SAM ``mu="auto"``: each global ascent group this rank now reads keeps the ``mu`` its rank
        calibrated (``optimizer``: the RW-SAM object, default :attr:`optimizer`)."""
        optimizer = self.optimizer if optimizer is None else optimizer
        if not isinstance(optimizer, RWSAM) or not optimizer.auto_mu:
            return
        c_old, c_new, rank = saved.groups_per_rank(self.cfg), self.plan.groups_per_rank(self.cfg), self.env.rank
        mus = {}
        for g in range(rank * c_new, (rank + 1) * c_new):
            entry = state["per_rank"][g // c_old]["optimizer"].get("rwsam", {})
            mus[g] = entry.get("group_mu", {}).get(g, entry.get("mu"))
        if None in mus.values():
            return  # not calibrated yet: it calibrates on its next batch
        optimizer.mu = mus[rank * c_new]
        optimizer.group_mu = mus if len(set(mus.values())) > 1 else {}

    def _log_replan(self, saved: BatchPlan, fresh_rng: bool) -> None:
        plan, rank = self.plan, self.env.rank
        if fresh_rng:
            log.warning("rank %d did not exist at world size %d: its RNG streams (dropout) start fresh", rank,
                        saved.world_size)
        if self.primary:
            log.info("re-planned for world size %d: per-worker batch %d -> %d, accumulation_steps %d -> %d "
                     "(global batch %d and %d samples per ascent group kept)", plan.world_size, saved.batch_size,
                     plan.batch_size, saved.accumulation_steps, plan.accumulation_steps, plan.global_batch, plan.chunk)

    def restore_position(self, state: dict[str, Any], mine: dict[str, Any] | None, path: str) -> None:
        """Epoch, step, data position, history, and this rank's RNG states (when it had some)."""
        if mine is not None:
            set_rng_state(mine["rng"])
        self.epoch, self.step_in_epoch = state["data"]["epoch"], state["data"]["step"]
        self.global_step, self.history = state["global_step"], list(state["history"])
        self.resumed_from, self.saved_at = path, state["global_step"]
        log.info("resumed from %s (epoch %d, step %d of the epoch, global step %d)",
                 path, self.epoch, self.step_in_epoch, self.global_step)
