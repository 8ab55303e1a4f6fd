"""SAM and RW-SAM under DeepSpeed ZeRO 0, 1, 2 and 3: add a ``sam`` section to the JSON you have.

    engine, optimizer, loader, scheduler = dist_sam.deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        config="ds_config.json", loss_fn=nn.CrossEntropyLoss(reduction="none"))
    for x, y in batches:                  # one micro-batch per call
        loss = engine.train_step((x, y))  # SAM step; DeepSpeed steps at accumulation boundaries
    engine.save_checkpoint("ckpt")        # SAM's step counter (and RW-SAM's mu) ride along

``{"sam": {"variant": "rwsam", "rho": 0.05, "ascent": "local", "lam": 0.5}}`` accepts the keys and
values of :class:`dist_sam.config.SamConfig`. The step is the shared core
(:func:`dist_sam.core.sam_passes`) driving :class:`~dist_sam.distributed.deepspeed_engine.DeepSpeedStepEngine`:
a local ascent through ``torch.autograd.grad`` on ``engine.module`` (ZeRO's reducing hooks never
fire), the perturbation on the module's own parameters (restored exactly), ``engine(x)`` and
``engine.backward(loss)`` as the only gradient reduction, the restore, then ``engine.step()``
(clipping applies to the descent gradient).

DeepSpeed owns the real (base) optimizer; a SAM-family object built on the module's parameters
with a never-stepped ``SGD(lr=0)`` base supplies ``perturb``/``restore`` and RW-SAM's
``ascent_loss``. fp16 uses DeepSpeed's own loss scaler (:mod:`dist_sam.distributed.ds_fp16`);
ZeRO-3 perturbs the gathered parameters (:mod:`dist_sam.distributed.zero3`, local ascent; SAM,
USAM, RW-SAM). Both rely on DeepSpeed internals and accept DeepSpeed 0.19.8 only.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from typing import Any, Callable

import torch
from torch import nn

from .config import SamConfig
from .distributed import collectives, ds_fp16
from .optim.rules import global_norm
from .core import per_sample_losses, sam_passes
from .distributed.deepspeed_engine import DeepSpeedStepEngine, check_looksam_config

__all__ = ["initialize", "SAMEngine", "load_config", "check_config"]

CLIENT_STATE_KEY = "dist_sam"
_FP16_NAMES = ("torch.float16", "fp16", "float16", "half")


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError as err:
        raise ImportError("dist_sam.deepspeed needs DeepSpeed: pip install 'dist-sam[deepspeed]'") from err
    return deepspeed


def load_config(config: dict | str | os.PathLike | None, args: Any = None) -> dict:
    """The DeepSpeed config as a dict: ``config`` (a dict or a JSON path) or ``args.deepspeed_config``."""
    if config is None:
        config = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    if config is None:
        raise ValueError("no DeepSpeed config: pass config=<dict or JSON path> or args.deepspeed_config")
    if isinstance(config, (str, os.PathLike)):
        with open(config) as fh:
            config = json.load(fh)
    if not isinstance(config, dict):
        raise ValueError(f"the DeepSpeed config must be a dict or a JSON path, got {type(config).__name__}")
    return config


def _enabled(section: Any) -> bool:
    return isinstance(section, dict) and bool(section.get("enabled", False))


def check_config(config: dict, world_size: int | None = None) -> SamConfig:
    """Validate ``config["sam"]`` and the DeepSpeed settings SAM depends on; return the SamConfig.

    Everything is checked before any engine is built. ``micro_batch_size`` is checked against
    ``train_micro_batch_size_per_gpu`` when the config gives it (or lets it be derived).

    Raises:
        ValueError: naming the field: a bad ``sam`` section, a stage-3 setting it cannot run (m-SAM,
            global ascent, ASAM), amp / fp16 autocast, ``ascent="full"``, an untested DeepSpeed
            version for fp16 or ZeRO-3.
    """
    if "sam" not in config:
        raise ValueError('the DeepSpeed config has no "sam" section; add one, e.g. "sam": {"variant": "sam", '
                         '"rho": 0.05} (or use deepspeed.initialize for plain training)')
    sam = SamConfig.from_dict(config["sam"])
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage={stage!r} is not a ZeRO stage (accepted: 0, 1, 2, 3)")
    if sam.variant == "looksam":
        check_looksam_config(config, stage)
    if stage == 3:
        _check_zero3(sam)
    _check_precision(config)
    if sam.ascent == "full":
        raise ValueError("sam.ascent='full' (n-SAM, benchmarks only) is not supported under DeepSpeed; accepted: "
                         "'local', 'micro', 'global' (use dist_sam.sam_step for 'full')")
    micro = _micro_batch(config, world_size)
    if sam.ascent == "micro" and micro is not None:
        _check_micro(sam, micro)
    return sam


def _check_zero3(sam: SamConfig) -> None:
    """ZeRO-3: device-local ascent on the gathered parameters (dist_sam.distributed.zero3)."""
    if sam.ascent != "local":
        raise ValueError(f"sam.ascent={sam.ascent!r} is not supported under zero_optimization.stage=3 (accepted: "
                         "'local'; m-SAM and the global ascent need whole parameters outside a forward)")
    if sam.is_adaptive:
        raise ValueError(f"sam.variant={sam.variant!r} / sam.adaptive=true is not supported under "
                         "zero_optimization.stage=3: ASAM's |w| needs whole parameters (accepted: sam, usam, rwsam)")
    ds_fp16.check_version("zero_optimization.stage=3")


def _check_precision(config: dict) -> None:
    """fp16 through DeepSpeed's own loss scaler (``"fp16": {"enabled": true}``); amp and fp16 autocast refused."""
    autocast = config.get("torch_autocast")
    if _enabled(config.get("amp")) or (_enabled(autocast) and str(autocast.get("dtype", "")) in _FP16_NAMES):
        raise ValueError(
            'amp / torch_autocast with an fp16 dtype is not supported with a sam section (accepted: "fp16": '
            '{"enabled": true}, which uses DeepSpeed\'s own loss scaler, "bf16": {"enabled": true}, or fp32)')
    if _enabled(config.get("fp16")):
        ds_fp16.check_version('"fp16": {"enabled": true}')


def _micro_batch(config: dict, world_size: int | None) -> int | None:
    if "train_micro_batch_size_per_gpu" in config:
        return config["train_micro_batch_size_per_gpu"]
    gas = config.get("gradient_accumulation_steps")
    if "train_batch_size" in config and gas and world_size:
        return config["train_batch_size"] // (gas * world_size)
    return None


def _check_micro(sam: SamConfig, micro: int) -> None:
    if micro % sam.micro_batch_size:
        raise ValueError(f"sam.micro_batch_size={sam.micro_batch_size} does not divide the micro-batch "
                         f"train_micro_batch_size_per_gpu={micro}; pick a divisor of it")


def initialize(args: Any = None, model: nn.Module | None = None, *, config: dict | str | os.PathLike | None = None,
               loss_fn: Callable | None = None, config_params: dict | str | None = None, **kwargs: Any):
    """``deepspeed.initialize`` that also reads the config's ``sam`` section.

    Args:
        args: as for ``deepspeed.initialize`` (``args.deepspeed_config`` is read when ``config`` is None).
        model: the ``nn.Module`` (not a ``PipelineModule``).
        config: the DeepSpeed config, a dict or a JSON path, with a ``sam`` section; or ``None`` to
            read ``args.deepspeed_config`` (the ``deepspeed`` launcher's ``--deepspeed_config``).
        loss_fn: ``loss_fn(outputs, targets)`` returning per-sample losses (``reduction="none"``);
            default ``nn.CrossEntropyLoss(reduction="none")``.
        config_params: the deprecated alias of ``config``.
        **kwargs: the rest of ``deepspeed.initialize`` (``optimizer``, ``model_parameters``,
            ``lr_scheduler``, ``training_data``, ...). The optimizer is the plain base one (from
            the config or a client ``torch.optim`` optimizer), never a SAM wrapper.

    Returns:
        ``(engine, optimizer, training_dataloader, lr_scheduler)`` as DeepSpeed returns them, with
        ``engine`` a :class:`SAMEngine` around the DeepSpeed engine.
    """
    if model is None:
        raise ValueError("model is required (the nn.Module to train)")
    cfg = load_config(config if config is not None else config_params, args)
    sam = check_config(cfg, collectives.world_size() if torch.distributed.is_initialized() else None)
    deepspeed = _import_deepspeed()
    if isinstance(model, deepspeed.pipe.PipelineModule):
        raise ValueError("model: a PipelineModule runs DeepSpeed's own train_batch schedule; SAM supports "
                         "data-parallel engines only")
    if kwargs.get("optimizer") is not None and hasattr(kwargs["optimizer"], "perturb"):
        raise ValueError("optimizer: pass the plain base optimizer; ZeRO swaps a wrapper's parameters for flat "
                         "partitions and steps it without a closure, so the SAM logic stays in dist-sam")
    if args is not None and (getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)):
        args = copy.copy(args)  # the config is passed explicitly below; DeepSpeed refuses both
        args.deepspeed_config = args.deepscale_config = None
    ds_config = {k: v for k, v in cfg.items() if k != "sam"}
    engine, optimizer, loader, scheduler = deepspeed.initialize(args=args, model=model, config=ds_config, **kwargs)
    if sam.ascent == "micro":
        _check_micro(sam, engine.train_micro_batch_size_per_gpu())
    if sam.ascent == "global" and engine.dp_world_size != collectives.world_size():
        raise ValueError("sam.ascent='global' needs the data-parallel group to be the whole world")
    return SAMEngine(engine, sam, loss_fn or nn.CrossEntropyLoss(reduction="none")), optimizer, loader, scheduler


class SAMEngine:
    """A DeepSpeed engine that takes SAM steps: :meth:`train_step`; every other attribute is the engine's.

    Attributes:
        engine: the ``DeepSpeedEngine``.
        module: the user's module (``engine.module``).
        sam: the SAM-family object supplying the perturbation (its base optimizer is never stepped).
        config: the validated :class:`~dist_sam.config.SamConfig`.
        loss_fn: the per-sample loss.
    """

    def __init__(self, engine: Any, config: SamConfig, loss_fn: Callable) -> None:
        self.engine, self.config, self.loss_fn = engine, config, loss_fn
        self.module = engine.module
        # Perturbation engine on the module's own (bf16 under bf16) parameters; lr=0 and never stepped.
        self.sam = config.build_optimizer(self.module.parameters(), base=torch.optim.SGD, lr=0.0)
        self._step_engine = DeepSpeedStepEngine(engine, self.sam.params, config)
        if config.variant == "looksam":  # its rule runs inside engine.step(), on DeepSpeed's gradients
            self._step_engine.install_looksam(self.sam)
        self._micro_index = 0  # micro-batch within the accumulation window (RW-SAM seeds)
        self._check_finite = self._arm_fp32_overflow_check()

    def _arm_fp32_overflow_check(self) -> bool:
        """Non-finite gradients never reach the weights, in fp32 too.

        DeepSpeed skips such steps under fp16/bf16, and its ZeRO 1/2 optimizer skips a step whose
        global gradient norm is not finite in fp32 too (tested). ZeRO-0 in fp32 steps the plain
        base optimizer: there the reduced gradients sit in ``.grad``, identical on every rank, and
        :meth:`train_step` checks them itself. Returns whether it must.
        """
        if self.engine.fp16_enabled() or self.engine.bfloat16_enabled():
            return False
        return not hasattr(self.engine.optimizer, "check_grad_overflow")  # not a DeepSpeedZeroOptimizer

    def _skip_if_nonfinite(self) -> None:
        """ZeRO-0 fp32: drop non-finite reduced gradients so the base optimizer skips every parameter."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if grads and not torch.isfinite(global_norm(grads)):
            for p in self.module.parameters():
                p.grad = None  # torch optimizers leave a parameter without .grad untouched
            self.engine.skipped_steps += 1
            warnings.warn("non-finite gradient: the step was skipped and the weights left untouched", stacklevel=3)

    def __getattr__(self, name: str) -> Any:
        if name == "engine":  # not set yet (copy, unpickling): avoid recursing
            raise AttributeError(name)
        return getattr(self.engine, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)

    def _autocast(self):
        from deepspeed.runtime.torch_autocast import autocast_if_enabled

        return autocast_if_enabled(self.engine)  # what engine.forward wraps the module in

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """One micro-batch: SAM ascent (local) and descent, then ``engine.step()``.

        Args:
            batch: ``(inputs, targets)``, this rank's micro-batch.

        Returns:
            The mean per-sample loss at the unperturbed weights (detached, float32).
        """
        inputs, targets = batch
        b = inputs.shape[0]
        c = 1
        if self.config.ascent == "micro":
            if b % self.config.micro_batch_size:
                raise ValueError(f"sam.micro_batch_size={self.config.micro_batch_size} does not divide this "
                                 f"micro-batch of {b} samples")
            c = b // self.config.micro_batch_size
        if self.sam.should_perturb():
            loss = self._sam_passes(inputs, targets, c)
        else:  # `interval` makes this a plain base step
            loss = per_sample_losses(self.loss_fn, self.engine(inputs), targets, b).mean()
            self.engine.backward(ds_fp16.descent_loss(self.engine, loss))  # ZeRO-0 fp16: pre-scaled
            loss = loss.detach().float()
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary and self._check_finite:
            self._skip_if_nonfinite()
        self.engine.step()
        self._micro_index += 1
        if boundary:
            self.sam.num_steps += 1
            self._micro_index = 0
        return loss

    def _sam_passes(self, inputs: torch.Tensor, targets: torch.Tensor, c: int) -> torch.Tensor:
        """Ascent and descent over ``c`` groups (the shared core); one reduction at the end."""
        return sam_passes(self._step_engine, self.sam, self.loss_fn, inputs, targets, c,
                          sync_ascent=self.config.ascent == "global", autocast=self._autocast,
                          context=dict(rank=collectives.rank()), group_offset=self._micro_index * c)

    # -- checkpointing: through the engine, SAM's counters in the client state ---------------------
    def save_checkpoint(self, save_dir: str, tag: Any = None, client_state: dict | None = None, **kwargs: Any):
        """``engine.save_checkpoint`` with SAM's state (step counter, RW-SAM's ``mu``) in the client state."""
        state = dict(client_state or {})
        # DeepSpeed writes the client state from rank 0 only; RW-SAM's mu="auto" is calibrated per rank
        state[CLIENT_STATE_KEY] = {"per_rank": collectives.all_gather_objects(self.sam.state_dict())}
        return self.engine.save_checkpoint(save_dir, tag=tag, client_state=state, **kwargs)

    def load_checkpoint(self, load_dir: str, tag: Any = None, **kwargs: Any):
        """``engine.load_checkpoint``; restores SAM's state and returns ``(path, client_state)``."""
        path, client_state = self.engine.load_checkpoint(load_dir, tag=tag, **kwargs)
        if client_state and CLIENT_STATE_KEY in client_state:
            client_state = dict(client_state)
            saved = client_state.pop(CLIENT_STATE_KEY)
            if "per_rank" in saved:  # this rank's own (rank 0's after a change of world size)
                ranks = saved["per_rank"]
                saved = ranks[collectives.rank()] if len(ranks) == collectives.world_size() else ranks[0]
            self.sam.load_state_dict(saved)
            self._micro_index = 0
        return path, client_state
