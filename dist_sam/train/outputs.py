"""The trainer's outputs: the run's summary, ``summary.json`` and the final weights ``model.pt``."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from .config import to_dict

__all__ = ["OutputsMixin"]


class OutputsMixin:
    """``summary`` and ``write_outputs`` for :class:`dist_sam.train.loop.Trainer` (which sets the attributes used here)."""

    def summary(self, finished: bool) -> dict[str, Any]:
        """Accuracy, throughput, step-time breakdown, communication per step and the resolved config."""
        steps = max(1, self.session_steps)
        comm = None
        if self.comm is not None:
            comm = {"allreduce_calls_per_step": self.comm.calls / steps, "allreduce_bytes_per_step": self.comm.bytes / steps,
                    "stop_flag_allreduces_per_step": self.stop.checks / steps,
                    "note": "DDP gradient all-reduces (CommCounter); SyncBatchNorm/buffer broadcasts and the "
                            "stop-signal flag (one float all-reduce every checkpoint.signal_check_every steps) not "
                            "included in the calls and bytes"}
        last = self.history[-1] if self.history else {}
        return {
            "finished": finished, "preempted": self.preempted, "stop_signal": self.stop.stop_signal,
            "batch_plan": self.plan.to_dict(), "top1": last.get("top1"), "top5": last.get("top5"), "val_loss": last.get("loss"),
            "best_top1": max((h["top1"] for h in self.history), default=None),
            "epochs_completed": len(self.history), "global_step": self.global_step, "world_size": self.env.world_size,
            "images_per_second": self.images_per_second(), "session_steps": self.session_steps,
            "step_time_ms": self.timer.breakdown(steps), "eval_seconds": self.eval_seconds,
            "comm_per_step": comm, "resumed_from": self.resumed_from, "history": self.history,
            "replica_weights_sha256": self.digests, "replicas_agree": len(set(self.digests)) == 1,
            "config": to_dict(self.cfg),
        }

    def write_outputs(self, summary: dict[str, Any]) -> None:
        """Rank 0: ``summary.json`` and the final weights ``model.pt`` (both atomic)."""
        if not self.primary:
            return
        out = self.cfg.run.output_dir
        tmp = os.path.join(out, ".summary.json.tmp")
        with open(tmp, "w") as fh:
            json.dump(summary, fh, indent=1)
        os.replace(tmp, os.path.join(out, "summary.json"))
        torch.save(self.final_state, os.path.join(out, ".model.pt.tmp"))
        os.replace(os.path.join(out, ".model.pt.tmp"), os.path.join(out, "model.pt"))
