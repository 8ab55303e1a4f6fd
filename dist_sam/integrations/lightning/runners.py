"""Which dist-sam step runs under which Lightning strategy, and what is checked before training.

=====================================================  ==============================================
Lightning strategy                                     dist-sam step
=====================================================  ==============================================
``"ddp"`` (``DDPStrategy``)                            :func:`dist_sam.sam_step` on Lightning's DDP
``ModelParallelStrategy`` (FSDP2 ``fully_shard``)      :func:`dist_sam.sam_step` on the sharded module
``"deepspeed_stage_2"`` (``DeepSpeedStrategy``, 0-2)   :class:`dist_sam.deepspeed.SAMEngine` on its engine
one device (``SingleDeviceStrategy``)                  :func:`dist_sam.sam_step` on the module
=====================================================  ==============================================

Lightning's ``"fsdp"`` is FSDP1 (``FullyShardedDataParallel``), which dist-sam's FSDP engine does not
drive; Lightning's FSDP2 path is ``ModelParallelStrategy`` with ``fully_shard`` in
``configure_model`` (the mixin's default shards the whole module as one unit), data parallel only:
``ModelParallelStrategy(data_parallel_size=<devices>, tensor_parallel_size=1)``.

On CPU, Lightning 2.6.6 itself refuses ``"fsdp"`` (a ``ValueError`` in ``Trainer``) and
``DeepSpeedStrategy`` (a ``RuntimeError`` in its ``setup_environment``) before any module hook
runs; DeepSpeed runs on CPU with ``DS_ACCELERATOR=cpu`` once that gate is lifted (the tests' ``CPUDeepSpeedStrategy``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn

from ...config import SamConfig
from ...distributed.ddp import ddp_of
from ...step import sam_step

__all__ = ["PRECISIONS", "check_trainer", "build_runner", "CoreRunner", "DeepSpeedRunner"]

#: Trainer precisions this integration runs, and the autocast dtype of each.
PRECISIONS = {"32-true": None, "bf16-mixed": torch.bfloat16}


def import_lightning():
    try:
        import lightning.pytorch as pl
    except ImportError as err:
        raise ImportError("dist_sam.integrations.lightning needs Lightning: pip install 'dist-sam[lightning]'") from err
    return pl


def _kind(strategy: Any) -> str:
    from lightning.pytorch.strategies import (DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy,
                                              SingleDeviceStrategy)

    if isinstance(strategy, DeepSpeedStrategy):  # a DDPStrategy subclass: test it first
        return "deepspeed"
    if isinstance(strategy, FSDPStrategy):
        raise ValueError("strategy='fsdp' is Lightning's FSDP1 (FullyShardedDataParallel), which dist-sam does not "
                         "drive; use strategy=ModelParallelStrategy() (FSDP2: fully_shard in configure_model)")
    for cls, kind in ((DDPStrategy, "ddp"), (ModelParallelStrategy, "fsdp2"), (SingleDeviceStrategy, "single")):
        if isinstance(strategy, cls):
            return kind
    raise ValueError(f"strategy {type(strategy).__name__} is not supported by dist-sam; accepted: 'ddp', "
                     "'deepspeed_stage_2' (ZeRO 0-2), ModelParallelStrategy (FSDP2), a single device")


def check_trainer(trainer: Any, sam: SamConfig, accumulation_steps: int, clip_grad_norm: float | None) -> str:
    """Refuse a strategy, precision or setting the step cannot run (``ValueError``, before training);
    set DeepSpeed's clipping from ``clip_grad_norm``. Returns the strategy's kind."""
    kind = _kind(trainer.strategy)
    if trainer.precision not in PRECISIONS:
        raise ValueError(f"Trainer(precision={trainer.precision!r}) is not supported by dist-sam's Lightning "
                         f"integration; accepted: {sorted(PRECISIONS)}")
    if kind == "fsdp2":
        _check_fsdp2(trainer.strategy, sam)
    if kind == "deepspeed":
        _check_deepspeed(trainer.strategy.config, sam, accumulation_steps, clip_grad_norm)
    return kind


def _check_fsdp2(strategy: Any, sam: SamConfig) -> None:
    tensor_parallel = strategy.device_mesh["tensor_parallel"].size()  # the mesh exists once processes started
    if tensor_parallel > 1:
        raise ValueError(f"ModelParallelStrategy with tensor_parallel_size={tensor_parallel} is not supported by "
                         "dist-sam (FSDP2 data parallelism only; on one node the strategy's default puts every "
                         "device in the tensor-parallel group); accepted: ModelParallelStrategy("
                         "data_parallel_size=<number of devices>, tensor_parallel_size=1)")
    if sam.ascent == "full":
        raise ValueError("sam.ascent='full' is not supported under FSDP2; accepted: 'local', 'micro', 'global'")


def _check_deepspeed(config: dict, sam: SamConfig, accumulation_steps: int, clip_grad_norm: float | None) -> None:
    from ...deepspeed import check_config

    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    if stage == 3:
        raise ValueError("DeepSpeed zero_optimization.stage=3 is not supported through Lightning (untested); "
                         "accepted: 0, 1, 2 (or dist_sam.deepspeed.initialize directly for ZeRO-3)")
    if accumulation_steps > 1 and sam.ascent == "global":
        raise ValueError(f"accumulation_steps={accumulation_steps} with sam.ascent='global' is not supported under "
                         "DeepSpeed; accepted there: ascent 'local' or 'micro'")
    from ...config import RWSAM_FIELDS

    section = {k: v for k, v in dataclasses.asdict(sam).items() if sam.variant == "rwsam" or k not in RWSAM_FIELDS}
    check_config({**config, "sam": section})
    if clip_grad_norm is not None:
        # DeepSpeed clips the reduced gradient inside engine.step(), as sam_step clips the descent's
        if config.get("gradient_clipping", clip_grad_norm) not in (clip_grad_norm, 0.0):
            raise ValueError(f"clip_grad_norm={clip_grad_norm} differs from the DeepSpeed config's gradient_clipping="
                             f"{config['gradient_clipping']}; set one of them")
        config["gradient_clipping"] = clip_grad_norm


class CoreRunner:
    """:func:`dist_sam.sam_step` on the model Lightning prepared (DDP, FSDP2 or one device).

    The SAM-family object is built around Lightning's base optimizer (they share param groups),
    so Lightning checkpoints the base state and LR schedulers see the same groups.
    """

    def __init__(self, model: nn.Module, base: torch.optim.Optimizer, sam: SamConfig, dtype: torch.dtype | None,
                 **step_options: Any) -> None:
        self.model, self.dtype, self.step_options = model, dtype, step_options
        self.step_options.update(sam.step_kwargs())
        self.sam = sam.build_optimizer(None, base=base)

    def step(self, loss_fn: Callable, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ddp = ddp_of(self.model)
        if ddp is not None:
            # Lightning runs training_step inside DDP's forward and, under manual optimization, that
            # outer forward ends by clearing this flag; plain DDP leaves it set after a synchronized
            # step, so that the next forward broadcasts rank 0's buffers (BatchNorm statistics).
            ddp.require_forward_param_sync = True
        # bf16-mixed: Lightning's autocast region (cache_enabled=False, so each forward casts the
        # weights it sees, w + e included) wraps the step; sam_step autocasts its forwards alike.
        return sam_step(self.model, self.sam, loss_fn, inputs, targets, autocast_dtype=self.dtype,
                        **self.step_options)


class DeepSpeedRunner:
    """:class:`dist_sam.deepspeed.SAMEngine` on Lightning's DeepSpeed engine (ZeRO 0-2, gas 1).

    Lightning sets DeepSpeed's ``gradient_accumulation_steps`` to 1 in manual optimization, so
    ``accumulation_steps=k`` cuts each batch into ``k`` ascent groups inside the one engine step,
    exactly as :func:`dist_sam.sam_step` does: under ``ascent="local"`` that is m-SAM with
    ``m = b / k`` (the same :func:`~dist_sam.core.sam_passes` call), one reduction.
    """

    def __init__(self, engine: Any, sam: SamConfig, loss_fn: Callable, accumulation_steps: int,
                 freeze_bn: bool) -> None:
        from ...deepspeed import SAMEngine

        if not freeze_bn:
            raise ValueError("freeze_bn=False is not supported under DeepSpeed (its step freezes BatchNorm statistics "
                             "in the descent, as sam_step's default does)")
        self.config, self.k = sam, accumulation_steps
        self.adapter = SAMEngine(engine, sam, loss_fn)
        self.sam = self.adapter.sam

    def step(self, loss_fn: Callable, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        b = inputs.shape[0]
        if b % self.k:
            raise ValueError(f"accumulation_steps={self.k} does not divide the batch size {b}")
        if self.k > 1 and self.config.ascent == "local":  # k local ascent groups = m-SAM with m = b/k
            self.adapter.config = dataclasses.replace(self.config, ascent="micro", micro_batch_size=b // self.k)
        return self.adapter.train_step((inputs, targets))


def build_runner(kind: str, module: Any, base: torch.optim.Optimizer, loss_fn: Callable, *, sam: SamConfig,
                 accumulation_steps: int, clip_grad_norm: float | None, freeze_bn: bool):
    """The runner of the strategy ``kind`` (from :func:`check_trainer`) for this LightningModule."""
    strategy = module.trainer.strategy
    if kind == "deepspeed":
        return DeepSpeedRunner(strategy.model, sam, loss_fn, accumulation_steps, freeze_bn)
    if kind == "fsdp2":
        from ...distributed.engines import is_fsdp

        if not is_fsdp(module):
            raise ValueError("ModelParallelStrategy: the module is not sharded; call fully_shard in configure_model "
                             "(the mixin's default configure_model shards the whole module)")
    model = strategy.model if kind == "ddp" else module  # Lightning's DistributedDataParallel
    return CoreRunner(model, base, sam, PRECISIONS[module.trainer.precision], accumulation_steps=accumulation_steps,
                      clip_grad_norm=clip_grad_norm, freeze_bn=freeze_bn)
