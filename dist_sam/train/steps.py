"""The optimizer a config asks for, and the one training step that drives it."""

from __future__ import annotations

import torch
from torch import nn

from ..optim import BASE_OPTIMIZERS as BASE_CLASSES
from ..optim import create_optimizer
from ..optim.sam import SAM
from ..step import base_step, sam_step
from .config import TrainConfig

__all__ = ["build_optimizer", "peak_lr", "plain_step", "train_step", "AUTOCAST_DTYPES", "BASE_CLASSES"]

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def peak_lr(cfg: TrainConfig, world_size: int, global_batch: int | None = None) -> float:
    """``optim.lr``, scaled linearly to the global batch when ``optim.reference_batch_size`` is set.

    ``global_batch`` defaults to ``world_size * data.batch_size`` (a resume at another world size
    passes the run's own, which it keeps)."""
    if cfg.optim.reference_batch_size is None:
        return cfg.optim.lr
    batch = world_size * cfg.data.batch_size if global_batch is None else global_batch
    return cfg.optim.lr * batch / cfg.optim.reference_batch_size


def build_optimizer(cfg: TrainConfig, params, world_size: int, global_batch: int | None = None) -> SAM:
    """``create_optimizer`` with the config's base optimizer; ``sam: null`` gives ``rho = 0`` and
    plain steps (:func:`plain_step`), i.e. exactly the base optimizer."""
    kwargs = dict(base=cfg.optim.base, lr=peak_lr(cfg, world_size, global_batch), **cfg.optim.base_kwargs())
    if cfg.sam is None:
        return create_optimizer("sam", params, rho=0.0, **kwargs)
    return cfg.sam.build_optimizer(params, **kwargs)


def plain_step(model: nn.Module, optimizer: SAM, loss_fn, inputs: torch.Tensor, targets: torch.Tensor, *,
               clip_grad_norm: float | None, scaler: torch.amp.GradScaler | None,
               autocast_dtype: torch.dtype | None, accumulation_steps: int = 1) -> torch.Tensor:
    """One base-optimizer step (``k`` forwards and backwards, one all-reduce); returns the mean loss."""
    return base_step(model, optimizer, loss_fn, inputs, targets, clip_grad_norm=clip_grad_norm, scaler=scaler,
                     autocast_dtype=autocast_dtype, accumulation_steps=accumulation_steps).float()


def train_step(cfg: TrainConfig, model: nn.Module, optimizer: SAM, loss_fn, inputs: torch.Tensor,
               targets: torch.Tensor, scaler: torch.amp.GradScaler | None, accumulation_steps: int = 1) -> torch.Tensor:
    """One step as the config says: :func:`dist_sam.sam_step`, or :func:`plain_step` with ``sam: null``.

    ``accumulation_steps`` is the batch plan's (:mod:`dist_sam.train.plan`), which a resume at
    another world size may change from ``optim.accumulation_steps``."""
    fsdp = cfg.model.parallel == "fsdp"  # bf16 there is FSDP2's MixedPrecisionPolicy, not autocast
    common = dict(clip_grad_norm=cfg.optim.clip_grad_norm, scaler=scaler, accumulation_steps=accumulation_steps,
                  autocast_dtype=None if fsdp else AUTOCAST_DTYPES[cfg.run.precision])
    if cfg.sam is None:
        return plain_step(model, optimizer, loss_fn, inputs, targets, **common)
    extra = {"fsdp_memory": cfg.model.fsdp_memory} if fsdp else {}
    return sam_step(model, optimizer, loss_fn, inputs, targets, **cfg.sam.step_kwargs(), **common, **extra)
