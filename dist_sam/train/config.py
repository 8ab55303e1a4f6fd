"""``TrainConfig``: one YAML file plus ``key.sub=value`` overrides, validated before anything runs.

Each section is a small keyword-only dataclass validated in ``__post_init__`` (``run:``,
``model:``, ``optim:``, ``schedule:`` and ``checkpoint:`` are in :mod:`.sections`, re-exported
here); the ``sam:`` section is :class:`dist_sam.config.SamConfig` and ``data:`` is
:class:`dist_sam.data.DataConfig`. A ``ValueError`` names the offending key (``optim.lr``), its value and what is accepted. The
resolved config is saved beside the outputs (``config.yaml``) and inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import yaml

from ..config import SamConfig, foreign_fields
from ..data import DataConfig
from .sections import (COMPILE_MODES, PRECISIONS, CheckpointConfig, ModelConfig, OptimConfig, RunConfig,
                       ScheduleConfig, _fail)

__all__ = ["TrainConfig", "RunConfig", "ModelConfig", "OptimConfig", "ScheduleConfig", "CheckpointConfig",
           "load_config", "parse_overrides", "to_dict", "RESUME_MAY_DIFFER", "PRECISIONS", "COMPILE_MODES"]

#: Keys that may change between a run and its resume (paths, logging, stopping, fault limits, loader threads).
RESUME_MAY_DIFFER = ("run.output_dir", "run.stop_at_step", "run.log_every", "run.progress", "run.tensorboard",
                     "run.collective_timeout_s", "run.max_skipped_steps",
                     "checkpoint.*", "data.root", "data.num_workers", "data.dali_cpu_threads", "data.validate_files",
                     "data.device", "data.val_batch_size", "model.compile", "model.compile_mode",
                     "model.compile_backend")


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
