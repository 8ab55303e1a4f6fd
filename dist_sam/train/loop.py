"""``Trainer``: DDP training with a SAM-family optimizer, per-epoch evaluation, resumable checkpoints.

One object owns the run's state (model, optimizer, scheduler, scaler, data position, RNG); each
method does one thing: :meth:`Trainer.run` loops over epochs, :meth:`Trainer.train_epoch` over
steps, :meth:`Trainer.save` / :meth:`Trainer.resume` write and read the checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from ..checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from ..data import build_loader
from ..distributed import CommCounter, DistEnv, barrier
from .config import RESUME_MAY_DIFFER, TrainConfig, dump_yaml, to_dict
from .metrics import Scalars, StepTimer, evaluate
from .models import build_model
from .schedule import warmup_cosine
from .state import (CHECKPOINT_VERSION, RANK_LOCAL_OPTIMIZER_KEYS, gather, rng_state, seed_everything, set_rng_state,
                    weights_digest)
from .steps import AUTOCAST_DTYPES, build_optimizer, train_step

__all__ = ["Trainer"]

log = logging.getLogger("dist_sam.train")
FAULT_ENV = "DIST_SAM_FAULT_AT_STEP"  # testing aid: "rank:step" SIGKILLs that rank at that step, first attempt only


def _maybe_inject_fault(rank: int, step: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if spec and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and spec == f"{rank}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


class Trainer:
    """Everything ``launch/train.py`` runs, for one rank.

    Args:
        cfg: the validated config.
        env: this rank's place in the job (after ``init_distributed``).
    """

    def __init__(self, cfg: TrainConfig, env: DistEnv) -> None:
        self.cfg, self.env, self.primary = cfg, env, env.rank == 0
        seed_everything(cfg.run.seed, env.rank, cfg.run.deterministic)
        self.loaders = build_loader(cfg.data, env.rank, env.world_size)
        self.device = self.loaders.train.device
        num_classes = cfg.model.num_classes or len(self.loaders.train.index.classes)
        sync_bn = cfg.model.sync_bn and env.world_size > 1 and self.device.type == "cuda"
        if cfg.model.sync_bn and not sync_bn:
            warnings.warn("model.sync_bn is ignored: SyncBatchNorm needs several processes on GPUs", stacklevel=2)
        with torch.random.fork_rng(devices=[]):  # identical initial weights on every rank
            torch.manual_seed(cfg.run.seed)
            model = build_model(cfg.model.name, num_classes=num_classes, channels_last=cfg.data.channels_last,
                                sync_bn=sync_bn).to(self.device)
        self.loss_fn = nn.CrossEntropyLoss(reduction="none", label_smoothing=cfg.optim.label_smoothing)
        self.module: nn.Module = model  # the user's module: evaluated and saved
        self.comm: CommCounter | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.setup(model)
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.resumed_from: str | None = None
        self.digests: list[str] = []
        self.timer = StepTimer(self.device)
        self.session_steps = self.session_images = 0
        self.eval_seconds = 0.0
        out = cfg.run.output_dir
        self.scalars = Scalars(os.path.join(out, "tensorboard") if self.primary and cfg.run.tensorboard else None)

    def setup(self, model: nn.Module) -> None:
        """``torch.compile`` (``model.compile``), DDP (several processes), the optimizer, the LR
        schedule and the fp16 scaler. DDP wraps the compiled module (:mod:`dist_sam.compiled`)."""
        spec = self.cfg.model
        self.model = torch.compile(model, mode=spec.compile_mode, backend=spec.compile_backend) if spec.compile else model
        if self.env.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(self.model, device_ids=ids)
            self.comm = CommCounter.attach(self.model)
        self.optimizer = build_optimizer(self.cfg, model.parameters(), self.env.world_size)
        self.scheduler = self.build_scheduler(self.optimizer)
        if self.cfg.run.precision == "fp16":
            self.scaler = torch.amp.GradScaler(self.device.type)

    def build_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        steps_per_epoch = len(self.loaders.train)
        return warmup_cosine(optimizer, total_steps=self.cfg.run.epochs * steps_per_epoch,
                             warmup_steps=round(self.cfg.schedule.warmup_epochs * steps_per_epoch),
                             min_lr_ratio=self.cfg.schedule.min_lr_ratio)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimizer step and one LR-schedule step; returns the mean loss at ``w``."""
        loss = train_step(self.cfg, self.model, self.optimizer, self.loss_fn, images, labels, self.scaler)
        self.scheduler.step()
        return loss

    # -- checkpoints ---------------------------------------------------------------------------
    def rank_state(self) -> dict[str, Any]:
        """What differs between ranks: the RNG states and RW-SAM's per-rank calibrated ``mu``."""
        optimizer = self.optimizer.state_dict()
        return {"rng": rng_state(), "optimizer": {k: optimizer[k] for k in RANK_LOCAL_OPTIMIZER_KEYS if k in optimizer}}

    def position(self) -> dict[str, Any]:
        """Where training stands (rank-independent): epoch, step, data position, eval history."""
        return {"version": CHECKPOINT_VERSION, "config": to_dict(self.cfg), "world_size": self.env.world_size,
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "data": {"epoch": self.epoch, "step": self.step_in_epoch},  # the loaders resume exactly there
                "history": self.history}

    def state_dict(self, per_rank: list[dict[str, Any]]) -> dict[str, Any]:
        """The whole training state; all but ``per_rank`` (indexed by rank) is the same on every rank."""
        return {**self.position(), "model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None, "per_rank": per_rank}

    def save(self) -> None:
        """Gather the per-rank state, then rank 0 writes atomically (a collective call)."""
        with self.timer("checkpoint"):
            per_rank = gather(self.rank_state())
            if self.primary:
                path = save_checkpoint(self.state_dict(per_rank), self.cfg.checkpoint_dir, step=self.global_step,
                                       keep_last=self.cfg.checkpoint.keep_last)
                log.debug("checkpoint %s", path)

    def resume_path(self) -> str | None:
        """``checkpoint.resume``: ``never`` -> None, ``auto`` -> the latest checkpoint (or None), else the path."""
        choice = self.cfg.checkpoint.resume
        return None if choice == "never" else latest_checkpoint(self.cfg.checkpoint_dir) if choice == "auto" else choice

    def resume(self) -> None:
        """Load the checkpoint :meth:`resume_path` names, on every rank."""
        path = self.resume_path()
        if path is None:
            return
        state = load_checkpoint(path, config=to_dict(self.cfg), ignore=RESUME_MAY_DIFFER)
        self.check_world_size(state, path)
        self.module.load_state_dict(state["model"])
        mine = state["per_rank"][self.env.rank]  # indexed by the *current* rank: ranks may be reassigned
        self.optimizer.load_state_dict({**state["optimizer"], **mine["optimizer"]})
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.restore_position(state, mine, path)

    def check_world_size(self, state: dict[str, Any], path: str) -> None:
        if state["world_size"] != self.env.world_size:
            raise CheckpointError(f"refusing checkpoint {path}: written with world size {state['world_size']}, "
                                  f"running with {self.env.world_size}; the data order and batch differ")

    def restore_position(self, state: dict[str, Any], mine: dict[str, Any], path: str) -> None:
        """Epoch, step, data position, history, and this rank's RNG states."""
        set_rng_state(mine["rng"])
        self.epoch, self.step_in_epoch = state["data"]["epoch"], state["data"]["step"]
        self.global_step, self.history = state["global_step"], list(state["history"])
        self.resumed_from = path
        log.info("resumed from %s (epoch %d, step %d of the epoch, global step %d)",
                 path, self.epoch, self.step_in_epoch, self.global_step)

    # -- training ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train to ``run.epochs`` (or ``run.stop_at_step``), evaluating each epoch; return the summary."""
        self.resume()
        if self.primary:
            os.makedirs(self.cfg.run.output_dir, exist_ok=True)
            with open(os.path.join(self.cfg.run.output_dir, "config.yaml"), "w") as fh:
                fh.write(dump_yaml(self.cfg))
        stopped = False
        while self.epoch < self.cfg.run.epochs and not stopped:
            if self.step_in_epoch < len(self.loaders.train):
                stopped = self.train_epoch()
            if stopped:
                break
            if not any(h["epoch"] == self.epoch for h in self.history):
                self.evaluate_epoch()
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self.save()
        self.sync_buffers()
        self.digests = gather(weights_digest(self.module))  # every replica, bit for bit
        barrier()
        self.scalars.close()
        return self.summary(finished=not stopped)

    def _stop_now(self) -> bool:
        stop = self.cfg.run.stop_at_step
        return stop is not None and self.global_step >= stop

    def train_epoch(self) -> bool:
        """Train from the current position to the end of the epoch; True if stopped early."""
        cfg, loader = self.cfg, self.loaders.train
        if self._stop_now():
            return True
        loader.load_state_dict({"epoch": self.epoch, "step": self.step_in_epoch})
        loader.set_epoch(self.epoch)
        self.model.train()
        bar = tqdm(total=len(loader), initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}/{cfg.run.epochs}",
                   disable=not (self.primary and cfg.run.progress), dynamic_ncols=True, leave=False,
                   mininterval=0.1 if sys.stderr.isatty() else 5.0)  # a log file gets a few lines, not hundreds
        batches, start = iter(loader), time.perf_counter()
        while True:
            with self.timer("data"):
                batch = next(batches, None)
            if batch is None:
                break
            images, labels, _ = batch  # padding repeats train like DistributedSampler's; eval masks them
            with self.timer("step"):
                loss = self.step(images, labels)
            self.global_step, self.step_in_epoch = self.global_step + 1, self.step_in_epoch + 1
            self.session_steps += 1
            self.session_images += images.shape[0] * self.env.world_size
            bar.update(1)
            _maybe_inject_fault(self.env.rank, self.global_step)
            if self.global_step % cfg.run.log_every == 0 or self.step_in_epoch == len(loader):
                self._log_step(loss.item(), bar, time.perf_counter() - start)
            every = cfg.checkpoint.every_steps
            if every and self.global_step % every == 0:
                self.save()
            if self._stop_now():
                if not (every and self.global_step % every == 0):
                    self.save()
                bar.close()
                return True
        bar.close()
        return False

    def _log_step(self, loss: float, bar: tqdm, elapsed: float) -> None:
        rate = self.images_per_second()
        lr = self.optimizer.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.0f}", lr=f"{lr:.4g}")
        self.scalars.add("train/loss", loss, self.global_step)
        self.scalars.add("train/lr", lr, self.global_step)
        self.scalars.add("train/img_per_s", rate, self.global_step)

    def images_per_second(self) -> float:
        seconds = self.timer.totals.get("data", 0.0) + self.timer.totals.get("step", 0.0)
        return self.session_images / seconds if seconds > 0 else 0.0

    def sync_buffers(self) -> None:
        """Rank 0's BatchNorm statistics on every rank, as DDP's next forward would broadcast them.

        Each rank's last forward updated its own running statistics; evaluation and the replica
        check must see one model (the one rank 0 saves).
        """
        if isinstance(self.model, DDP):
            for buffer in self.module.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def evaluate_epoch(self) -> dict[str, float]:
        self.sync_buffers()
        start = time.perf_counter()
        metrics = evaluate(self.module, self.loaders.val,  # no DDP: no collective per batch
                           autocast_dtype=AUTOCAST_DTYPES[self.cfg.run.precision])
        self.eval_seconds += time.perf_counter() - start
        entry = {"epoch": self.epoch, "global_step": self.global_step, **metrics}
        self.history.append(entry)
        for key in ("top1", "top5", "loss"):
            self.scalars.add(f"val/{key}", metrics[key], self.global_step)
        log.info("epoch %d/%d  val top-1 %.2f%%  top-5 %.2f%%  loss %.4f  (%d images)  train %.0f img/s",
                 self.epoch + 1, self.cfg.run.epochs, metrics["top1"], metrics["top5"], metrics["loss"],
                 metrics["num_samples"], self.images_per_second())
        return metrics

    # -- outputs -------------------------------------------------------------------------------
    def summary(self, finished: bool) -> dict[str, Any]:
        """Accuracy, throughput, step-time breakdown, communication per step and the resolved config."""
        steps = max(1, self.session_steps)
        comm = None
        if self.comm is not None:
            comm = {"allreduce_calls_per_step": self.comm.calls / steps, "allreduce_bytes_per_step": self.comm.bytes / steps,
                    "note": "DDP gradient all-reduces (CommCounter); SyncBatchNorm/buffer broadcasts not included"}
        last = self.history[-1] if self.history else {}
        return {
            "finished": finished, "top1": last.get("top1"), "top5": last.get("top5"), "val_loss": last.get("loss"),
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
        torch.save(self.module.state_dict(), os.path.join(out, ".model.pt.tmp"))
        os.replace(os.path.join(out, ".model.pt.tmp"), os.path.join(out, "model.pt"))
