"""``TrainConfig``: one YAML file plus ``key.sub=value`` overrides, validated before anything runs.

Each section is a small keyword-only dataclass validated in ``__post_init__``; the ``sam:`` section
is :class:`dist_sam.config.SamConfig` and ``data:`` is :class:`dist_sam.data.DataConfig`. A
``ValueError`` names the offending key (``optim.lr``), its value and what is accepted. The
resolved config is saved beside the outputs (``config.yaml``) and inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import re
import signal
import warnings
from typing import Any, Mapping, Sequence

import yaml

from ..config import SamConfig, foreign_fields
from ..data import DataConfig
from ..distributed.fsdp import FSDP_MEMORY
from .models import MODELS
from .parallel import PARALLEL

__all__ = ["TrainConfig", "RunConfig", "ModelConfig", "OptimConfig", "ScheduleConfig", "CheckpointConfig",
           "load_config", "parse_overrides", "to_dict", "RESUME_MAY_DIFFER", "PRECISIONS", "COMPILE_MODES"]

PRECISIONS = ("fp32", "bf16", "fp16")
#: ``torch.compile`` modes (``model.compile_mode``; ``null`` is torch's default).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_UNCATCHABLE = ("SIGKILL", "SIGSTOP", "SIGCHLD", "SIGCLD", "SIGRTMIN", "SIGRTMAX")
BASES = ("sgd", "adamw", "adam")
#: Keys that may change between a run and its resume (paths, logging, stopping, loader threads).
RESUME_MAY_DIFFER = ("run.output_dir", "run.stop_at_step", "run.log_every", "run.progress", "run.tensorboard",
                     "checkpoint.*", "data.root", "data.num_workers", "data.dali_cpu_threads", "data.validate_files",
                     "data.device", "data.val_batch_size", "model.compile", "model.compile_mode",
                     "model.compile_backend")


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


@dataclasses.dataclass(kw_only=True)
class ModelConfig:
    """``name`` in :data:`~dist_sam.train.models.MODELS`; ``num_classes: null`` counts the class folders.

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
        _choice("model.name", self.name, MODELS)
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


_SECTIONS: dict[str, type] = {"run": RunConfig, "model": ModelConfig, "optim": OptimConfig, "schedule": ScheduleConfig,
                              "sam": SamConfig, "data": DataConfig, "checkpoint": CheckpointConfig}


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    """Every setting of a training run; ``sam: null`` trains with the plain base optimizer (SGD)."""

    data: DataConfig
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    sam: SamConfig | None = None
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        if self.model.parallel == "fsdp":
            self._check_fsdp()

    def _check_fsdp(self) -> None:
        """What ``model.parallel: fsdp`` cannot run, refused with the field that says so."""
        if self.run.precision == "fp16":
            _fail("run.precision", "fp16", "'fp32' or 'bf16' with model.parallel=fsdp (bf16 parameters with "
                  "float32 reduction; fp16 loss scaling is not supported under FSDP2)")
        if self.model.sync_bn:
            _fail("model.sync_bn", True, "false with model.parallel=fsdp")
        if self.sam is not None and self.sam.ascent == "full":
            _fail("sam.ascent", "full", "'local', 'micro' or 'global' with model.parallel=fsdp")
        if self.sam is not None and self.model.fsdp_memory == "lean":
            asam = self.sam.variant == "asam" or getattr(self.sam, "adaptive", False)
            estimator = getattr(self.sam, "estimator", None) if self.sam.variant == "rwsam" else None
            if asam or estimator in ("fd", "exact"):
                _fail("model.fsdp_memory", "lean", "'resident' for ASAM and RW-SAM's fd/exact estimators (they "
                      "need the full weights, which lean does not keep), or use estimator: last_layer")

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or f"{self.run.output_dir.rstrip('/')}/checkpoints"

    @classmethod
    def from_dict(cls, tree: Mapping[str, Any]) -> "TrainConfig":
        """Build and validate from a nested dict; unknown keys raise ``ValueError`` naming them."""
        if not isinstance(tree, Mapping):
            raise ValueError(f"the config must be a mapping of sections {sorted(_SECTIONS)}, got {type(tree).__name__}")
        unknown = sorted(set(tree) - set(_SECTIONS))
        if unknown:
            raise ValueError(f"unknown config section(s) {unknown}; accepted: {sorted(_SECTIONS)}")
        if tree.get("data") is None:
            raise ValueError("config key 'data.root' is required (the dataset folder in the ImageNet layout)")
        sections = {name: _section(name, _SECTIONS[name], tree[name]) for name in tree if tree[name] is not None}
        return cls(**sections)


def _section(name: str, cls: type, values: Any) -> Any:
    if not isinstance(values, Mapping):
        raise ValueError(f"config section {name!r} must be a mapping, got {values!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"unknown config key(s) {[f'{name}.{k}' for k in unknown]}; accepted in {name!r}: {sorted(fields)}")
    try:
        return cls.from_dict(values) if hasattr(cls, "from_dict") else cls(**values)
    except ValueError as err:
        message = str(err).replace(f"{cls.__name__}.", f"{name}.")  # DataConfig.batch_size -> data.batch_size
        raise ValueError(message if f"{name}." in message else f"config section {name!r}: {message}") from None
    except TypeError as err:  # a required field is missing
        raise ValueError(f"config section {name!r}: {err}") from None


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved config as plain nested dicts (YAML- and checkpoint-safe); RW-SAM's and LookSAM's own
    keys are left out of other variants' ``sam`` section, so the file loads back without warnings."""
    tree = dataclasses.asdict(cfg)
    if tree["sam"] is not None:
        tree["sam"] = {k: v for k, v in tree["sam"].items() if k not in foreign_fields(tree["sam"]["variant"])}
    return tree


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``5e-4`` as a string; read it as the float everyone means."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["optim.lr=0.1", "sam.variant=sam", "sam=null"]`` -> nested dict; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. optim.lr=0.1)")
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[leaf] = yaml.load(raw, Loader=_Loader) if raw else None
    return tree


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def load_config(path: str | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read ``path`` (YAML), apply ``key.sub=value`` overrides, validate; raise ``ValueError`` naming bad keys."""
    tree: dict[str, Any] = {}
    if path is not None:
        with open(path) as fh:
            tree = yaml.load(fh, Loader=_Loader) or {}
        if not isinstance(tree, dict):
            raise ValueError(f"{path}: the config must be a mapping of sections, got {type(tree).__name__}")
    return TrainConfig.from_dict(_merge(tree, parse_overrides(overrides)))


def dump_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML text (the ``config.yaml`` beside the outputs)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
