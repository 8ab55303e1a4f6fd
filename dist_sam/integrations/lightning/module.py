"""``SAMMixin``: a LightningModule whose training step is dist-sam's, under manual optimization.

    class Net(SAMMixin, L.LightningModule):
        def __init__(self):
            super().__init__(sam={"rho": 0.05}, accumulation_steps=2, clip_grad_norm=1.0)
            self.net = SmallCNN(10)
        def forward(self, x):
            return self.net(x)
        def per_sample_loss(self, outputs, targets):
            return F.cross_entropy(outputs, targets, reduction="none")
        def configure_optimizers(self):          # the plain base optimizer, as for any LightningModule
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    L.Trainer(strategy="ddp", accelerator="cpu", devices=2, precision="bf16-mixed").fit(Net(), loader)

The mixin sets ``automatic_optimization = False`` and its ``training_step`` hands the model
Lightning prepared to the one step core (:mod:`.runners`): device-local ascent, one gradient
reduction, exact restore, then the base step, counted as Lightning's optimizer step. Lightning
refuses ``Trainer(accumulate_grad_batches=..., gradient_clip_val=...)`` under manual optimization,
so both are the mixin's: ``accumulation_steps`` cuts each batch into chunks, each with its own
ascent, and one reduction per step; ``clip_grad_norm`` clips the reduced descent gradient.
Checkpoints are Lightning's: the base optimizer's state is Lightning's ``optimizer_states``; SAM's
own state (its step counter, RW-SAM's ``mu``) rides along under ``checkpoint["dist_sam"]``.
Subclasses that override ``setup``, ``configure_model``, ``on_train_start``, ``on_save_checkpoint``
or ``on_load_checkpoint`` call ``super()``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ...config import SamConfig
from ...optim.sam import SAM
from ...train.state import gather
from . import runners

__all__ = ["SAMMixin", "CHECKPOINT_KEY"]

CHECKPOINT_KEY = "dist_sam"


class SAMMixin:
    """Mix into a ``LightningModule`` (before it in the bases); the subclass writes ``forward``,
    :meth:`per_sample_loss` and ``configure_optimizers`` (returning the plain base optimizer).

    Args:
        sam: a :class:`dist_sam.config.SamConfig` or its mapping (variant, rho, ascent, ...).
        accumulation_steps: chunks per batch, each with its own ascent; one reduction per step.
        clip_grad_norm: clip the reduced descent gradient to this norm (``None``: no clipping).
        freeze_bn: keep BatchNorm running statistics as the ascent forward left them.
        *args, **kwargs: the LightningModule's own.

    Batches are ``(inputs, targets)``; the step's loss is logged as ``train_loss``.
    """

    def __init__(self, *args: Any, sam: SamConfig | Mapping[str, Any] | None = None, accumulation_steps: int = 1,
                 clip_grad_norm: float | None = None, freeze_bn: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be an integer >= 1, got {accumulation_steps!r}")
        if clip_grad_norm is not None and not (isinstance(clip_grad_norm, (int, float)) and math.isfinite(clip_grad_norm)
                                               and clip_grad_norm > 0):
            raise ValueError(f"clip_grad_norm must be a finite number > 0 or None, got {clip_grad_norm!r}")
        if not isinstance(freeze_bn, bool):
            raise ValueError(f"freeze_bn must be True or False, got {freeze_bn!r}")
        self.sam_config = sam if isinstance(sam, SamConfig) else SamConfig.from_dict(sam)
        self.sam_accumulation_steps, self.sam_clip_grad_norm, self.sam_freeze_bn = \
            accumulation_steps, clip_grad_norm, freeze_bn
        self.automatic_optimization = False
        self._sam_kind: str | None = None
        self._sam_runner = None
        self._sam_saved: dict | None = None

    def per_sample_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The per-sample loss, shape ``(b,)`` (e.g. ``cross_entropy(..., reduction="none")``)."""
        raise NotImplementedError("define per_sample_loss(outputs, targets) returning one loss per sample")

    @property
    def sam_optimizer(self) -> SAM:
        """The SAM-family object of the run (built at ``on_train_start``)."""
        if self._sam_runner is None:
            raise RuntimeError("sam_optimizer exists once training has started (on_train_start)")
        return self._sam_runner.sam

    # -- Lightning hooks ---------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit":
            return
        if type(self).per_sample_loss is SAMMixin.per_sample_loss:
            raise ValueError(f"{type(self).__name__} must define per_sample_loss(outputs, targets) returning "
                             "per-sample losses of shape (b,)")
        self._sam_kind = runners.check_trainer(self.trainer, self.sam_config, self.sam_accumulation_steps,
                                               self.sam_clip_grad_norm)

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (FSDP2): shard the whole module as one ``fully_shard``
        unit over the data-parallel mesh, unless it already is. Override to shard per block
        (then the root too: dist-sam's FSDP2 engine wants the root sharded)."""
        super().configure_model()
        from lightning.pytorch.strategies import ModelParallelStrategy

        from ...distributed.engines import is_fsdp

        if isinstance(self.trainer.strategy, ModelParallelStrategy) and not is_fsdp(self):
            from torch.distributed.fsdp import fully_shard

            fully_shard(self, mesh=self.device_mesh["data_parallel"])

    def on_train_start(self) -> None:
        super().on_train_start()
        optimizers = self.trainer.optimizers
        optimizer = optimizers[0] if len(optimizers) == 1 else optimizers
        if self._sam_kind == "deepspeed":  # ZeRO 1-2 wrap the client optimizer in one of their own
            optimizer = getattr(optimizer, "optimizer", optimizer)
        if isinstance(optimizer, list) or not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError("configure_optimizers must return one plain torch optimizer (the base optimizer), got "
                             f"{type(optimizer).__name__}")
        if isinstance(optimizer, SAM):
            raise ValueError("configure_optimizers: return the plain base optimizer; the mixin builds the "
                             f"{self.sam_config.variant!r} optimizer around it from its sam config")
        self._sam_runner = runners.build_runner(
            self._sam_kind, self, optimizer, self.per_sample_loss, sam=self.sam_config,
            accumulation_steps=self.sam_accumulation_steps, clip_grad_norm=self.sam_clip_grad_norm,
            freeze_bn=self.sam_freeze_bn)
        if self._sam_saved is not None:
            sam, ranks = self._sam_runner.sam, self._sam_saved["per_rank"]
            saved = ranks[self.global_rank] if len(ranks) == self.trainer.world_size else ranks[0]
            sam.load_state_dict({**sam.base_optimizer.state_dict(), **saved})  # the base: as Lightning restored it
            self._sam_saved = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """One dist-sam step on ``batch = (inputs, targets)``, counted as one optimizer step."""
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError(f"batches must be (inputs, targets) pairs, got {type(batch).__name__}"
                             + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
        inputs, targets = batch
        optimizer = self.optimizers()  # the LightningOptimizer: its step hooks keep Lightning's count
        optimizer._on_before_step()  # what LightningOptimizer.step brackets its step with (global_step)
        loss = self._sam_runner.step(self.per_sample_loss, inputs, targets)
        optimizer._on_after_step()
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._sam_runner is not None:  # a collective: Lightning calls this hook on every rank
            sam = self._sam_runner.sam
            own = set(sam.state_dict()) - set(sam.base_optimizer.state_dict())  # SAM's keys, not the base's
            checkpoint[CHECKPOINT_KEY] = {"per_rank": gather({k: sam.state_dict()[k] for k in own})}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._sam_saved = checkpoint.get(CHECKPOINT_KEY)  # applied once the SAM object exists (on_train_start)
