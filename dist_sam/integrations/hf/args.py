"""SAM's options for :class:`~dist_sam.integrations.hf.SAMTrainer`: a :class:`~dist_sam.config.SamConfig`,
or ``TrainingArguments`` fields prefixed ``sam_`` (so ``HfArgumentParser`` reads them from the command line)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from transformers import TrainingArguments

from ...config import SamConfig

__all__ = ["SAMTrainingArguments", "resolve_sam_config"]


@dataclasses.dataclass
class SAMTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus ``sam_<field>`` for each field of :class:`~dist_sam.config.SamConfig`.

    ``sam_mu`` is a string (``"auto"`` or a number) so that the command line can give either.
    """

    sam_variant: str = dataclasses.field(default="sam", metadata={"help": "sam | usam | asam | rwsam | looksam"})
    sam_rho: float | None = dataclasses.field(default=None, metadata={"help": "radius (default: 0.5 asam, else 0.05)"})
    sam_adaptive: bool = False
    sam_eta: float | None = None
    sam_ascent: str = dataclasses.field(default="local", metadata={"help": "local | micro"})
    sam_micro_batch_size: int | None = None
    sam_interval: int = 1
    sam_lam: float = 0.5
    sam_estimator: str = dataclasses.field(default="fd", metadata={"help": "fd | last_layer"})
    sam_mu: str = "auto"
    sam_num_directions: int = 1
    sam_normalization: str = "zscore"
    sam_k: int = 5
    sam_alpha: float = 0.3
    sam_warmup: int = 0

    def sam_config(self) -> SamConfig:
        """The validated :class:`~dist_sam.config.SamConfig` of the ``sam_`` fields."""
        values = {f.name: getattr(self, f"sam_{f.name}") for f in dataclasses.fields(SamConfig)}
        if values["mu"] != "auto":
            try:
                values["mu"] = float(values["mu"])
            except ValueError:
                raise ValueError(f"sam_mu must be 'auto' or a number > 0, got {values['mu']!r}") from None
        if values["variant"] != "rwsam":  # RW-SAM's fields at their defaults mean nothing here
            for name in ("lam", "estimator", "mu", "num_directions", "normalization"):
                values.pop(name)
        if values["variant"] != "looksam":  # so are LookSAM's
            for name in ("k", "alpha", "warmup"):
                values.pop(name)
        return SamConfig(**values)


def resolve_sam_config(sam: SamConfig | Mapping[str, Any] | None, args: TrainingArguments) -> SamConfig:
    """``sam`` if given (a SamConfig or a mapping of its fields), else the ``sam_`` fields of ``args``, else SAM's defaults."""
    if isinstance(sam, SamConfig):
        return sam
    if sam is not None:
        return SamConfig.from_dict(sam)
    if isinstance(args, SAMTrainingArguments):
        return args.sam_config()
    return SamConfig()
