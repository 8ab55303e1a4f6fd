"""``SAMTrainer``: a ``transformers.Trainer`` whose training step is dist-sam's step core.

Trainer keeps its loop: data, accumulation windows (``no_sync`` on all but the last micro-batch),
clipping, the optimizer and scheduler steps, logging and checkpoints. Each micro-batch Trainer
hands to :meth:`SAMTrainer.training_step` is one group of the SAM step (SPEC.md §2): its own
device-local ascent, its perturbation, its descent backward (``1/k`` of the step's gradient) and
the restore, all by :func:`dist_sam.core.sam_passes` on the model Trainer prepared:

* plain / DDP: the DDP engine (:func:`dist_sam.distributed.engines.engine_for`); DDP reduces once,
  at the last micro-batch, where Trainer lets it sync, as in Trainer's own step;
* FSDP2 (Accelerate's plugin, ``fsdp_version=2``): the FSDP2 engine on the ``fully_shard`` model
  (:class:`dist_sam.distributed.fsdp.FSDPEngine`, device-local ascent on the unsharded copies);
  Trainer's ``no_sync`` keeps the descents of a window's earlier micro-batches unreduced, so the
  window reduce-scatters once, at its last micro-batch, as in Trainer's own step;
* DeepSpeed ZeRO 0-3: :class:`dist_sam.deepspeed.SAMEngine` around Trainer's DeepSpeed engine
  (``engine.backward`` reduces as in Trainer's step, ``engine.step`` at the boundary).

So a window of ``k`` micro-batches is ``sam_step(..., accumulation_steps=k)`` on their
concatenation. Under bf16 the forwards are Trainer's (Accelerate's autocast around the model).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Mapping

import torch
from torch import nn
from transformers import Trainer

from ...config import SamConfig
from ...core import plain_passes, sam_passes
from ...distributed import collectives
from ...distributed.engines import engine_for
from ...optim.registry import create_optimizer
from ...optim.rules import global_norm
from ...optim.rwsam import RWSAM
from ...optim.sam import SAM
from .args import resolve_sam_config
from .batch import Batch, accept_batches
from .checks import check_supported
from .stats import Recording, StepStats

__all__ = ["SAMTrainer", "LogitsCrossEntropy", "cross_entropy_per_sample", "STATE_FILE"]

#: Per-rank file beside Trainer's checkpoint: SAM's step counter and RW-SAM's calibrated ``mu``.
STATE_FILE = "dist_sam_rank{rank}.pt"


class LogitsCrossEntropy(nn.CrossEntropyLoss):
    """Per-sample cross-entropy of a Hugging Face output's ``logits`` (``reduction="none"``).

    An ``nn.CrossEntropyLoss``, so RW-SAM's ``last_layer`` estimator knows its closed form applies.
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__(reduction="none", label_smoothing=label_smoothing)

    def forward(self, outputs: Any, labels: torch.Tensor) -> torch.Tensor:
        return super().forward(outputs.logits if hasattr(outputs, "logits") else outputs, labels)


#: The default per-sample loss of :class:`SAMTrainer`.
cross_entropy_per_sample = LogitsCrossEntropy()


class SAMTrainer(Trainer):
    """``transformers.Trainer`` taking SAM-family steps (SAM, USAM, ASAM, RW-SAM) with dist-sam's core.

    Args:
        *args: as for ``Trainer``.
        sam: the SAM options, a :class:`~dist_sam.config.SamConfig` or a mapping of its fields;
            ``None``: the ``sam_`` fields of a :class:`~dist_sam.integrations.hf.SAMTrainingArguments`
            (or SAM's defaults for plain ``TrainingArguments``).
        per_sample_loss: ``loss(outputs, labels)`` returning one loss per sample (shape ``(b,)``);
            default :data:`cross_entropy_per_sample`. The model's own (mean) loss is not used: the
            labels are taken out of the batch before the forward.
        **kwargs: as for ``Trainer``.

    Raises:
        ValueError: a combination it cannot run (naming it), before training starts.
    """

    def __init__(self, *args: Any, sam: SamConfig | Mapping[str, Any] | None = None,
                 per_sample_loss: Callable[[Any, torch.Tensor], torch.Tensor] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sam_config = resolve_sam_config(sam, self.args)
        self.per_sample_loss = per_sample_loss or cross_entropy_per_sample
        check_supported(self)
        self.label_name = self.label_names[0]
        accept_batches(self.model)  # model(Batch) -> model(**batch), below every wrapper Trainer adds
        self._sam: SAM | None = None  # the SAM-family object (Trainer's optimizer, or DeepSpeed's perturbation)
        self._ds_engine = None  # dist_sam.deepspeed.SAMEngine, built on Trainer's DeepSpeed engine
        self._pending_state: dict | None = None  # SAM's state from a checkpoint, until the object exists
        self._micro = 0  # micro-batch within the accumulation window (RW-SAM's direction seeds)
        self.sam_stats = StepStats()

    # -- the optimizer ---------------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Trainer's usual base optimizer (its class, groups, lr, weight decay), wrapped in the SAM variant.

        Under DeepSpeed the base optimizer stays unwrapped: ZeRO owns it, and the perturbation is
        :class:`dist_sam.deepspeed.SAMEngine`'s own SAM object (built at the first step).
        """
        optimizer = super().create_optimizer(model)
        if self.is_deepspeed_enabled:
            if isinstance(optimizer, SAM):
                raise ValueError("optimizers: under DeepSpeed pass the plain base optimizer; ZeRO owns it and "
                                 "dist-sam builds the perturbation itself")
            return optimizer
        if not isinstance(optimizer, SAM):
            self.optimizer = create_optimizer(self.sam_config.variant, None, base=optimizer,
                                              **self.sam_config.optimizer_kwargs())
        self._sam = self.optimizer
        return self.optimizer

    # -- the step --------------------------------------------------------------------------------
    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """One micro-batch: one group of the SAM step (ascent, perturb, descent, restore).

        Returns the mean per-sample loss at ``w`` divided by the window's micro-batch count, as
        Trainer's own step returns it for its logs.
        """
        model.train()
        inputs = dict(self._prepare_inputs(inputs))
        if self.label_name not in inputs:
            raise ValueError(f"the batch has no {self.label_name!r} (the labels per_sample_loss takes); keys: "
                             f"{sorted(inputs)}")
        labels = inputs.pop(self.label_name)
        batch = Batch(inputs)
        k = self.current_gradient_accumulation_steps
        with self.compute_loss_context_manager():
            if self.is_deepspeed_enabled:
                loss = self._deepspeed_step(model, batch, labels)
            else:
                loss = self._engine_step(model, batch, labels, k)
        self._micro = 0 if self.accelerator.sync_gradients else self._micro + 1
        return (loss / k).to(self.args.device)

    def _groups(self, batch: Batch) -> int:
        if self.sam_config.ascent != "micro":
            return 1
        m = self.sam_config.micro_batch_size
        if batch.size % m:
            raise ValueError(f"sam.micro_batch_size={m} does not divide this micro-batch of {batch.size} samples")
        return batch.size // m

    def _engine_step(self, model: nn.Module, batch: Batch, labels: torch.Tensor, k: int) -> torch.Tensor:
        sam = self._ready_sam()
        engine = Recording(engine_for(model), divisor=k)  # the DDP engine, descent scaled by 1/k
        engine.check(sam)
        if sam.should_perturb():
            c = self._groups(batch)
            loss = sam_passes(engine, sam, self.per_sample_loss, batch, labels, c, context=dict(rank=collectives.rank()),
                              group_offset=self._micro * c)
            self.sam_stats.record(engine.norms, sam)
        else:  # `interval` makes this a plain base step
            loss = plain_passes(engine, self.per_sample_loss, batch, labels, 1)
        if self.accelerator.sync_gradients and not self.is_fsdp_enabled:  # FSDP2: in _get_grad_norm
            self._skip_if_nonfinite(sam)
        return loss

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        """Trainer's gradient norm (across shards); under FSDP2 a non-finite one skips the step.

        The sharded gradients' norm needs a reduction: Trainer's own (for clipping and its logs) is
        reused, so the check costs no collective of its own.
        """
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if self.is_fsdp_enabled and self._sam is not None and not torch.isfinite(torch.as_tensor(grad_norm)):
            for p in self._sam.params:
                p.grad = None
            warnings.warn("non-finite gradient: the step was skipped and the weights left untouched", stacklevel=2)
        return grad_norm

    def _skip_if_nonfinite(self, sam: SAM) -> None:
        """The reduced gradient is not finite (identical on every rank): drop it, so the base optimizer
        leaves every weight untouched, as :func:`dist_sam.sam_step` skips such a step."""
        grads = [p.grad for p in sam.params if p.grad is not None]
        if grads and not torch.isfinite(global_norm(grads)):
            for p in sam.params:
                p.grad = None
            warnings.warn("non-finite gradient: the step was skipped and the weights left untouched", stacklevel=3)

    def _deepspeed_step(self, model: nn.Module, batch: Batch, labels: torch.Tensor) -> torch.Tensor:
        if self._ds_engine is None:
            from ...deepspeed import SAMEngine

            self._ds_engine = SAMEngine(model, self.sam_config, self.per_sample_loss)
            # the adapter's own step engine, recorded: its train_step runs sam_passes on it unchanged
            self._ds_engine._step_engine = Recording(self._ds_engine._step_engine)
            self._sam = self._ds_engine.sam
        sam = self._ready_sam()
        # Accelerate's boundary (the epoch's last, short window included), as its backward sets it
        model.set_gradient_accumulation_boundary(is_boundary=self.accelerator.sync_gradients)
        perturbed = sam.should_perturb()
        loss = self._ds_engine.train_step((batch, labels))
        if perturbed:
            self.sam_stats.record(self._ds_engine._step_engine.norms, sam)
        return loss

    def _ready_sam(self) -> SAM:
        if self._pending_state is not None:
            _load_sam_state(self._sam, self._pending_state)
            self._pending_state = None
        return self._sam

    # -- logs and checkpoints --------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Trainer's logs plus ``sam_ascent_norm`` (and ``rwsam_weight_entropy``) since the last log,
        averaged over the ranks (one small all-reduce per log, as Trainer's loss)."""
        if "loss" in logs:
            logs.update(self.sam_stats.drain(lambda t: self.accelerator.reduce(t, reduction="mean")))
        super().log(logs, *args, **kwargs)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        steps = None if self._sam is None else self._sam.num_steps
        super()._save_optimizer_and_scheduler(output_dir)
        if self._sam is not None:
            # FSDP2: DCP's get_optimizer_state_dict steps an optimizer with empty state (zero gradients,
            # lr 0) to fill it, e.g. after a skipped first step; that is not one of SAM's steps
            self._sam.num_steps = steps  # every rank its own: RW-SAM's mu="auto" is calibrated per rank
            state = {k: v for k, v in self._sam.state_dict().items() if k in ("sam", "rwsam")}
            os.makedirs(output_dir, exist_ok=True)  # rank 0 may not have made it yet
            torch.save(state, os.path.join(output_dir, STATE_FILE.format(rank=collectives.rank())))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, STATE_FILE.format(rank=collectives.rank()))
        if not os.path.isfile(path):  # another world size: rank 0's
            path = os.path.join(checkpoint, STATE_FILE.format(rank=0))
        if os.path.isfile(path):
            self._pending_state = torch.load(path, weights_only=False)


def _load_sam_state(sam: SAM, saved: dict) -> None:
    """SAM's own entries of a state dict onto ``sam``, its base optimizer's state left as loaded."""
    state = sam.state_dict()
    state.update(saved)
    sam.load_state_dict(state)
    if isinstance(sam, RWSAM):
        sam.last_weights = None
