"""The config sections other than ``sam:`` and ``data:``, and the validators they share.

Each section is a small keyword-only dataclass validated in ``__post_init__``; a ``ValueError``
names the offending key (``optim.lr``), its value and what is accepted. :mod:`dist_sam.train.config`
assembles them into :class:`~dist_sam.train.config.TrainConfig` and re-exports every name here.
"""

from __future__ import annotations

import dataclasses
import signal
import warnings
from typing import Any, Sequence

from ..distributed.fsdp import FSDP_MEMORY
from .models import check_model_name
from .parallel import PARALLEL

__all__ = ["RunConfig", "ModelConfig", "OptimConfig", "ScheduleConfig", "CheckpointConfig", "PRECISIONS",
           "COMPILE_MODES", "BASES"]

PRECISIONS = ("fp32", "bf16", "fp16")
#: ``torch.compile`` modes (``model.compile_mode``; ``null`` is torch's default).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_UNCATCHABLE = ("SIGKILL", "SIGSTOP", "SIGCHLD", "SIGCLD", "SIGRTMIN", "SIGRTMAX")
BASES = ("sgd", "adamw", "adam")


def _fail(key: str, value: Any, accepted: str) -> None:
    raise ValueError(f"config key {key!r}: got {value!r}; expected {accepted}")


def _int(key: str, value: Any, low: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(key, value, f"an integer >= {low}" + (" or null" if optional else ""))


def _num(key: str, value: Any, low: float, high: float = float("inf"), optional: bool = False, open_low: bool = False) -> None:
    if optional and value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value <= high
    ok = ok and (value > low if open_low else value >= low)
    if not ok:
        lo = f"> {low}" if open_low else f">= {low}"
        _fail(key, value, f"a number {lo}" + (f" and <= {high}" if high != float("inf") else "") + (" or null" if optional else ""))


def _bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(key, value, "true or false")


def _choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        _fail(key, value, f"one of {list(choices)}")


@dataclasses.dataclass(kw_only=True)
class RunConfig:
    """Where outputs go and how long to train.

    ``stop_at_step`` ends the run early after that global step, with a checkpoint to resume from
    (time-limited jobs, tests); ``deterministic`` turns on ``torch.use_deterministic_algorithms``.
    ``collective_timeout_s``: how long a collective waits for a peer before it fails (every rank
    then exits with status 69, naming the step; ``init_process_group``'s timeout, every backend and
    launcher; ``--collective-timeout-s`` overrides it). ``max_skipped_steps``: that many non-finite
    steps in a row (skipped, the weights untouched) stop the run with status 65, naming the step,
    the pass and the loss scale, keeping the last good checkpoint.
    """

    output_dir: str = "runs/default"
    seed: int = 0
    epochs: int = 90
    stop_at_step: int | None = None
    deterministic: bool = False
    precision: str = "fp32"
    log_every: int = 10
    progress: bool = True
    tensorboard: bool = True
    collective_timeout_s: float = 600.0
    max_skipped_steps: int = 100

    def __post_init__(self) -> None:
        if not isinstance(self.output_dir, str) or not self.output_dir:
            _fail("run.output_dir", self.output_dir, "a non-empty path")
        _int("run.seed", self.seed, 0)
        _int("run.epochs", self.epochs, 1)
        _int("run.stop_at_step", self.stop_at_step, 1, optional=True)
        _bool("run.deterministic", self.deterministic)
        _choice("run.precision", self.precision, PRECISIONS)
        _int("run.log_every", self.log_every, 1)
        _bool("run.progress", self.progress)
        _bool("run.tensorboard", self.tensorboard)
        _num("run.collective_timeout_s", self.collective_timeout_s, 0.0, open_low=True)
        _int("run.max_skipped_steps", self.max_skipped_steps, 1)


@dataclasses.dataclass(kw_only=True)
class ModelConfig:
    """``name`` in :data:`~dist_sam.train.models.MODELS` or ``timm/<name>`` (any ``timm.list_models()``
    name, random init; needs ``pip install 'dist-sam[timm]'``); ``num_classes: null`` counts the class folders.

    ``parallel``: ``ddp`` (a replica per process) or ``fsdp`` (FSDP2 units per residual stage or
    encoder block, see :mod:`dist_sam.train.parallel`; checkpoints through
    torch.distributed.checkpoint, every rank writing its shard). ``fsdp_memory``: ``resident`` or
    ``lean`` (:mod:`dist_sam.distributed.fsdp`). Under ``fsdp``, ``run.precision: bf16`` means
    bf16 parameters with float32 gradient reduction (``MixedPrecisionPolicy``), not autocast.

    ``sync_bn`` converts BatchNorm to SyncBatchNorm (ignored with one process). For channels_last
    memory format set ``data.channels_last``: it converts both the batches and the model.
    ``compile: true`` trains ``DDP(torch.compile(model, mode=compile_mode, backend=compile_backend))``
    (:mod:`dist_sam.compiled`); evaluation and checkpoints use the eager module (same weights).
    """

    name: str = "resnet50"
    num_classes: int | None = None
    sync_bn: bool = False
    compile: bool = False
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    parallel: str = "ddp"
    fsdp_memory: str = "resident"

    def __post_init__(self) -> None:
        check_model_name(self.name)
        _int("model.num_classes", self.num_classes, 2, optional=True)
        _bool("model.sync_bn", self.sync_bn)
        _bool("model.compile", self.compile)
        if self.compile_mode is not None:
            _choice("model.compile_mode", self.compile_mode, COMPILE_MODES)
        if not isinstance(self.compile_backend, str) or not self.compile_backend:
            _fail("model.compile_backend", self.compile_backend, "a torch.compile backend name, e.g. 'inductor'")
        _choice("model.parallel", self.parallel, PARALLEL)
        _choice("model.fsdp_memory", self.fsdp_memory, FSDP_MEMORY)
        if self.compile and self.parallel == "fsdp":
            _fail("model.compile", self.compile, "false with model.parallel=fsdp (torch.compile is supported under DDP)")


@dataclasses.dataclass(kw_only=True)
class OptimConfig:
    """The base optimizer and the loss.

    ``lr`` is the peak LR. With ``reference_batch_size`` set, it is the LR for that *global* batch
    and is scaled linearly to the actual one (``lr * world_size * batch_size / reference``).
    ``accumulation_steps`` splits each worker's batch into that many chunks (one forward each, one
    gradient all-reduce per step; under SAM's local ascent each chunk has its own ascent, m-SAM).
    """

    base: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    clip_grad_norm: float | None = None
    reference_batch_size: int | None = None
    accumulation_steps: int = 1

    def __post_init__(self) -> None:
        _choice("optim.base", self.base, BASES)
        _num("optim.lr", self.lr, 0.0, open_low=True)
        _num("optim.momentum", self.momentum, 0.0, 1.0)
        _bool("optim.nesterov", self.nesterov)
        _num("optim.weight_decay", self.weight_decay, 0.0)
        _num("optim.label_smoothing", self.label_smoothing, 0.0, 1.0)
        _num("optim.clip_grad_norm", self.clip_grad_norm, 0.0, optional=True, open_low=True)
        _int("optim.reference_batch_size", self.reference_batch_size, 1, optional=True)
        _int("optim.accumulation_steps", self.accumulation_steps, 1)
        if self.base != "sgd" and (self.momentum != 0.9 or self.nesterov):
            warnings.warn(f"optim.momentum/optim.nesterov apply to base 'sgd' only; ignored with {self.base!r}", stacklevel=3)

    def base_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the base optimizer (``lr`` excluded: it depends on the world size)."""
        if self.base == "sgd":
            return dict(momentum=self.momentum, nesterov=self.nesterov, weight_decay=self.weight_decay)
        return dict(weight_decay=self.weight_decay)


@dataclasses.dataclass(kw_only=True)
class ScheduleConfig:
    """Linear warmup over ``warmup_epochs`` then cosine down to ``min_lr_ratio * lr``."""

    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        _num("schedule.warmup_epochs", self.warmup_epochs, 0.0)
        _num("schedule.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)


@dataclasses.dataclass(kw_only=True)
class CheckpointConfig:
    """Rank 0 writes every ``every_steps`` optimizer steps (0: never mid-epoch) and at each epoch end.

    ``resume``: ``auto`` (the newest checkpoint in ``dir`` that loads, skipping damaged ones with a
    warning), ``never``, or a step directory (which must load). ``dir: null`` means
    ``<run.output_dir>/checkpoints``; on several nodes it must be shared storage.
    ``signals``: on any of these, every rank finishes the step in flight, they agree to stop
    (a one-element all-reduce every ``signal_check_every`` steps), write a checkpoint and exit with
    status 75 (``launch/slurm.sbatch`` requeues; torchrun restarts). ``[]`` keeps the default actions.
    """

    dir: str | None = None
    every_steps: int = 0
    keep_last: int = 3
    resume: str = "auto"
    signals: list[str] = dataclasses.field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    signal_check_every: int = 1

    def __post_init__(self) -> None:
        if self.dir is not None and (not isinstance(self.dir, str) or not self.dir):
            _fail("checkpoint.dir", self.dir, "a non-empty path or null")
        _int("checkpoint.every_steps", self.every_steps, 0)
        _int("checkpoint.keep_last", self.keep_last, 1)
        if not isinstance(self.resume, str) or not self.resume:
            _fail("checkpoint.resume", self.resume, "'auto', 'never' or a checkpoint path")
        names = [n for n in dir(signal) if n.startswith("SIG") and not n.startswith("SIG_") and n not in _UNCATCHABLE]
        if not isinstance(self.signals, list) or any(s not in names for s in self.signals):
            _fail("checkpoint.signals", self.signals, "a list of catchable signal names such as ['SIGTERM', 'SIGUSR1']")
        _int("checkpoint.signal_check_every", self.signal_check_every, 1)
