"""``Trainer``: DDP training with a SAM-family optimizer, per-epoch evaluation, resumable checkpoints.

One object owns the run's state (model, optimizer, scheduler, scaler, data position, RNG); each
method does one thing: :meth:`Trainer.run` loops over epochs, :meth:`Trainer.train_epoch` over
steps, :meth:`Trainer.save` / :meth:`Trainer.resume` (:mod:`.saving`) write and read the checkpoint.
The checkpoint to resume from is chosen first (:mod:`.resume`), since its batch plan (:mod:`.plan`)
decides the per-worker batch the loaders are built with. A stop signal (:mod:`.preempt`) ends the
run after the step in flight, with a checkpoint, on every rank at the same step. Faults
(:mod:`.faults`) end it on every rank, named: a failed write, a collective that timed out or lost
its peer, ``run.max_skipped_steps`` non-finite steps in a row (:mod:`.guard`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import time
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from ..data import build_loader
from ..distributed import CommCounter, DistEnv, barrier
from ..distributed.collectives import broadcast_
from ..optim.rwsam import RWSAM
from .config import TrainConfig, dump_yaml
from .faults import agree_on_write, attempt_write, collective_error
from .guard import NanLosses, NonFiniteGuard
from .metrics import Scalars, StepTimer, evaluate
from .models import build_model
from .plan import BatchPlan, initial_plan, replan
from .preempt import StopSignal, maybe_inject_fault, maybe_send_signal
from .parallel import shard
from .resume import find_checkpoint
from .outputs import OutputsMixin
from .saving import CheckpointMixin
from .sharded import full_model_state
from .schedule import warmup_cosine
from .state import gather, seed_everything, weights_digest
from .steps import AUTOCAST_DTYPES, build_optimizer, train_step

__all__ = ["Trainer"]

log = logging.getLogger("dist_sam.train")
def _stop_device() -> torch.device:
    """Where the stop flag is all-reduced: the CUDA device under NCCL, else the CPU."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Trainer(CheckpointMixin, OutputsMixin):
    """Everything ``launch/train.py`` runs, for one rank.

    Args:
        cfg: the validated config.
        env: this rank's place in the job (after ``init_distributed``).

    Raises:
        CheckpointError: the checkpoint to resume from does not load, or no batch plan at this
            world size keeps its global batch and ascent group size (before any work).
    """

    guarded = True  # watch for non-finite storms (DeepSpeed skips and counts its own)

    def __init__(self, cfg: TrainConfig, env: DistEnv) -> None:
        self.cfg, self.env, self.primary = cfg, env, env.rank == 0
        seed_everything(cfg.run.seed, env.rank, cfg.run.deterministic)
        self.stop = StopSignal(cfg.checkpoint.signals, cfg.checkpoint.signal_check_every, _stop_device())
        self.resumed_from, self._loaded = self.find_checkpoint()
        self.plan = self.batch_plan(self._loaded)
        data_cfg = dataclasses.replace(cfg.data, batch_size=self.plan.batch_size)
        self.loaders = build_loader(data_cfg, env.rank, env.world_size)
        self.device = self.loaders.train.device
        num_classes = cfg.model.num_classes or len(self.loaders.train.index.classes)
        sync_bn = cfg.model.sync_bn and env.world_size > 1 and self.device.type == "cuda"
        if cfg.model.sync_bn and not sync_bn:
            warnings.warn("model.sync_bn is ignored: SyncBatchNorm needs several processes on GPUs", stacklevel=2)
        with torch.random.fork_rng(devices=[]):  # identical initial weights on every rank
            torch.manual_seed(cfg.run.seed)
            model = build_model(cfg.model.name, num_classes=num_classes, channels_last=cfg.data.channels_last,
                                image_size=cfg.data.image_size,
                                sync_bn=sync_bn).to(self.device)
        self.loss_fn = NanLosses.wrap(nn.CrossEntropyLoss(reduction="none", label_smoothing=cfg.optim.label_smoothing),
                                      env.rank)
        self.module: nn.Module = model  # the user's module: evaluated and saved
        self.comm: CommCounter | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.setup(model)
        self.guard = (NonFiniteGuard(self.optimizer, self.scaler, cfg.run.max_skipped_steps, cfg.sam is None)
                      if self.guarded else None)
        self.in_flight = False  # a step is running (a collective failing now failed during it)
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.saved_at: int | None = None
        self.history: list[dict[str, Any]] = []
        self.digests: list[str] = []
        self.timer = StepTimer(self.device)
        self.session_steps = self.session_images = 0
        self.eval_seconds = 0.0
        out = cfg.run.output_dir
        self.scalars = Scalars(os.path.join(out, "tensorboard") if self.primary and cfg.run.tensorboard else None)

    def find_checkpoint(self) -> tuple[str | None, dict[str, Any] | None]:
        """The checkpoint to resume from and its state, agreed by every rank (:mod:`.resume`)."""
        return find_checkpoint(self.cfg)

    def batch_plan(self, state: dict[str, Any] | None) -> BatchPlan:
        """The config's plan for a fresh run; the saved one, re-planned to this world size, on resume."""
        if state is None:
            return initial_plan(self.cfg, self.env.world_size)
        return replan(BatchPlan.from_dict(state["plan"]), self.env.world_size, self.cfg, self.resumed_from)

    def setup(self, model: nn.Module) -> None:
        """``torch.compile`` (``model.compile``), DDP (several processes) or FSDP2, the optimizer, the
        LR schedule and the fp16 scaler. DDP wraps the compiled module (:mod:`dist_sam.compiled`)."""
        spec = self.cfg.model
        self.model = torch.compile(model, mode=spec.compile_mode, backend=spec.compile_backend) if spec.compile else model
        if self.cfg.model.parallel == "fsdp":  # the module itself is sharded (FSDP2 works in place)
            shard(model, param_dtype=torch.bfloat16 if self.cfg.run.precision == "bf16" else None)
        elif self.env.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(self.model, device_ids=ids)
            self.comm = CommCounter.attach(self.model)
        self.optimizer = build_optimizer(self.cfg, model.parameters(), self.env.world_size, self.plan.global_batch)
        if isinstance(self.optimizer, RWSAM):  # directions per global ascent group: the same at any world size
            self.optimizer.groups_per_rank = self.plan.groups_per_rank(self.cfg)
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
        loss = train_step(self.cfg, self.model, self.optimizer, self.loss_fn, images, labels, self.scaler,
                          self.plan.accumulation_steps)
        if self.sharded:
            self.sync_buffers()  # as DDP broadcasts rank 0's buffers before each forward
        self.scheduler.step()
        return loss

    # -- training ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train to ``run.epochs`` (or ``run.stop_at_step``, or a stop signal), evaluating each epoch;
        return the summary."""
        if threading.current_thread() is threading.main_thread():
            self.stop.install()  # until then a signal has its default action: no step to finish yet
        try:
            self.resume()
            self.write_config()
            stopped = self.train_epochs()
            self.sync_buffers()
            self.final_state = self.whole_state()
            self.digests = gather(weights_digest(self.final_state))  # every replica, bit for bit
            barrier()
        except RuntimeError as err:  # a collective that timed out or lost its peer, named with the step
            fault = collective_error(err, self.global_step + self.in_flight, "during" if self.in_flight else "after",
                                     self.cfg.run.collective_timeout_s)
            if fault is None:
                raise
            raise fault from err
        finally:
            self.stop.uninstall()
            self.scalars.close()
        return self.summary(finished=not stopped)

    def whole_state(self) -> dict[str, torch.Tensor]:
        """The whole model's state on every rank (a collective where the model is sharded)."""
        return full_model_state(self.model) if self.sharded else self.module.state_dict()

    def write_config(self) -> None:
        """Rank 0 writes ``config.yaml``; every rank stops, named, if it could not (a collective)."""
        path = os.path.join(self.cfg.run.output_dir, "config.yaml")

        def write() -> None:
            os.makedirs(self.cfg.run.output_dir, exist_ok=True)
            with open(path, "w") as fh:
                fh.write(dump_yaml(self.cfg))
        agree_on_write(attempt_write(write, path)[1] if self.primary else None, self.global_step, what=path)

    def train_epochs(self) -> bool:
        """The epoch loop; True if stopped early (``run.stop_at_step`` or a stop signal)."""
        while self.epoch < self.cfg.run.epochs:
            if self.step_in_epoch < len(self.loaders.train) and self.train_epoch():
                return True
            if not any(h["epoch"] == self.epoch for h in self.history):
                self.evaluate_epoch()
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self.save()  # a signal during evaluation stops the run after the next step
        return False

    @property
    def preempted(self) -> bool:
        """Whether a stop signal ended the run (every rank agrees)."""
        return self.stop.stop_signal is not None

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
        try:
            while True:
                with self.timer("data"):
                    batch = next(batches, None)
                if batch is None:
                    return False
                images, labels, _ = batch  # padding repeats train like DistributedSampler's; eval masks them
                maybe_send_signal(self.env.rank, self.global_step + 1)
                if isinstance(self.loss_fn, NanLosses):
                    self.loss_fn.at_step(self.global_step + 1)
                self.in_flight = True
                with self.timer("step"):
                    loss = self.step(images, labels)
                self.in_flight = False
                if self.guard is not None:  # raises after run.max_skipped_steps in a row
                    self.guard.check(loss, self.global_step + 1)
                self.global_step, self.step_in_epoch = self.global_step + 1, self.step_in_epoch + 1
                self.session_steps += 1
                self.session_images += images.shape[0] * self.env.world_size
                bar.update(1)
                maybe_inject_fault(self.env.rank, self.global_step)
                if self.global_step % cfg.run.log_every == 0 or self.step_in_epoch == len(loader):
                    self._log_step(loss.item(), bar, time.perf_counter() - start)
                if self.after_step():
                    return True
        finally:
            bar.close()

    def after_step(self) -> bool:
        """Periodic checkpoint; then stop (with a checkpoint) on a signal or at ``run.stop_at_step``."""
        every = self.cfg.checkpoint.every_steps
        if every and self.global_step % every == 0:
            self.save()
        stop = self.stop.agreed(self.global_step) or self._stop_now()
        if stop and self.saved_at != self.global_step:
            self.save()
        return stop

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
        if isinstance(self.model, DDP) or (self.sharded and self.env.world_size > 1):
            broadcast_(list(self.module.buffers()), src=0)

    def evaluate_epoch(self) -> dict[str, float]:
        self.sync_buffers()
        start = time.perf_counter()
        metrics = evaluate(self.module, self.loaders.val,  # no DDP: no collective per batch
                           autocast_dtype=None if self.sharded else AUTOCAST_DTYPES[self.cfg.run.precision])
        self.eval_seconds += time.perf_counter() - start
        entry = {"epoch": self.epoch, "global_step": self.global_step, **metrics}
        self.history.append(entry)
        for key in ("top1", "top5", "loss"):
            self.scalars.add(f"val/{key}", metrics[key], self.global_step)
        log.info("epoch %d/%d  val top-1 %.2f%%  top-5 %.2f%%  loss %.4f  (%d images)  train %.0f img/s",
                 self.epoch + 1, self.cfg.run.epochs, metrics["top1"], metrics["top5"], metrics["loss"],
                 metrics["num_samples"], self.images_per_second())
        return metrics
