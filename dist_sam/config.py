"""``SamConfig``: the ``sam`` section of a config (training YAML or DeepSpeed JSON), validated once.

    cfg = SamConfig.from_dict({"variant": "rwsam", "rho": 0.1, "lam": 0.5})
    opt = cfg.build_optimizer(model.parameters(), base="sgd", lr=0.1, momentum=0.9)
    sam_step(model, opt, loss_fn, x, y, **cfg.step_kwargs())

The accepted values are the Python API's (:func:`dist_sam.create_optimizer`, :func:`dist_sam.sam_step`);
every error is a ``ValueError`` naming ``sam.<field>``, the value and what is accepted.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Iterable, Mapping

from .optim.registry import create_optimizer
from .optim.rwsam import ESTIMATORS, NORMALIZATIONS
from .step import ASCENT_MODES

__all__ = ["SamConfig", "VARIANTS", "foreign_fields"]

VARIANTS = ("sam", "usam", "asam", "rwsam", "looksam")
#: Fields that only RW-SAM reads.
RWSAM_FIELDS = ("lam", "estimator", "mu", "num_directions", "normalization")
#: Fields that only LookSAM reads.
LOOKSAM_FIELDS = ("k", "alpha", "warmup")
#: Each variant's own fields, ignored (with a warning) under the other variants.
VARIANT_FIELDS = {"rwsam": RWSAM_FIELDS, "looksam": LOOKSAM_FIELDS}


def foreign_fields(variant: str) -> tuple[str, ...]:
    """The fields ``variant`` ignores (those of the other variants)."""
    return tuple(f for v, fields in VARIANT_FIELDS.items() if v != variant for f in fields)


def _fail(field: str, value: Any, accepted: str) -> None:
    raise ValueError(f"sam.{field} must be {accepted}, got {value!r}")


def _number(field: str, value: Any, *, positive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        _fail(field, value, "a finite number > 0" if positive else "a finite number >= 0")


def _integer(field: str, value: Any, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(field, value, f"an integer >= {low}")


def _choice(field: str, value: Any, accepted: tuple) -> None:
    if value not in accepted:
        _fail(field, value, f"one of {accepted}")


@dataclasses.dataclass(kw_only=True)
class SamConfig:
    """How a SAM-family step runs: the optimizer's options and the ascent mode.

    Attributes:
        variant: ``sam``, ``usam`` (unnormalized), ``asam`` (adaptive), ``rwsam`` (reweighted) or
            ``looksam`` (SAM every ``k`` steps, its direction reused in between).
        rho: perturbation radius ``>= 0``; ``None`` means the variant's default (0.5 for ``asam``,
            0.05 otherwise) and is resolved on construction.
        adaptive: ASAM's elementwise scale ``T = |w| + eta`` (always on for ``asam``; with ``rwsam``
            it gives RW-ASAM).
        eta: ASAM's offset ``>= 0``; ``None`` means 0.01 when adaptive, else 0.
        ascent: ``local`` (default), ``micro``, ``global`` or ``full`` (:func:`dist_sam.sam_step`).
        micro_batch_size: ``m`` for ``ascent="micro"`` (required there, ignored otherwise).
        interval: a SAM step every ``interval`` optimizer steps, plain base steps in between.
        lam: RW-SAM's Gibbs temperature ``>= 0``.
        estimator: RW-SAM's gradient-norm estimator, ``fd``, ``exact`` or ``last_layer``.
        mu: RW-SAM's finite-difference step ``> 0`` or ``"auto"``.
        num_directions: RW-SAM's number of Rademacher directions ``K >= 1``.
        normalization: RW-SAM's normalization, ``zscore``, ``mean`` or ``none``.
        k: LookSAM's look-step period, an integer ``>= 1`` (``interval`` stays 1 with LookSAM).
        alpha: LookSAM's weight of the reused direction, in ``[0, 1]``.
        warmup: LookSAM's number of full SAM steps first, an integer ``>= 0``.
    """

    variant: str = "sam"
    rho: float | None = None
    adaptive: bool = False
    eta: float | None = None
    ascent: str = "local"
    micro_batch_size: int | None = None
    interval: int = 1
    lam: float = 0.5
    estimator: str = "fd"
    mu: float | str = "auto"
    num_directions: int = 1
    normalization: str = "zscore"
    k: int = 5
    alpha: float = 0.3
    warmup: int = 0

    def __post_init__(self) -> None:
        _choice("variant", self.variant, VARIANTS)
        if self.rho is None:
            self.rho = 0.5 if self.variant == "asam" else 0.05
        _number("rho", self.rho)
        if not isinstance(self.adaptive, bool):
            _fail("adaptive", self.adaptive, "true or false")
        if self.eta is None:
            self.eta = 0.01 if self.is_adaptive else 0.0
        _number("eta", self.eta)
        _choice("ascent", self.ascent, ASCENT_MODES)
        if self.ascent == "micro":
            if self.micro_batch_size is None:
                raise ValueError("sam.micro_batch_size is required with sam.ascent='micro' (an integer >= 1)")
            _integer("micro_batch_size", self.micro_batch_size)
        elif self.micro_batch_size is not None:
            warnings.warn(f"sam.micro_batch_size={self.micro_batch_size} is ignored with sam.ascent={self.ascent!r}",
                          stacklevel=3)
        _integer("interval", self.interval)
        _number("lam", self.lam)
        _choice("estimator", self.estimator, ESTIMATORS)
        if self.mu != "auto":
            if isinstance(self.mu, str):
                _fail("mu", self.mu, "a finite number > 0 or 'auto'")
            _number("mu", self.mu, positive=True)
        _integer("num_directions", self.num_directions)
        _choice("normalization", self.normalization, NORMALIZATIONS)
        _integer("k", self.k)
        _number("alpha", self.alpha)
        if self.alpha > 1:
            _fail("alpha", self.alpha, "a number in [0, 1]")
        _integer("warmup", self.warmup, low=0)
        if self.variant == "looksam" and self.interval != 1:
            _fail("interval", self.interval, "1 with sam.variant='looksam' (its look-step period is sam.k)")
        if self.variant == "looksam" and self.ascent not in ("local", "micro"):
            _fail("ascent", self.ascent, "'local' or 'micro' with sam.variant='looksam'")

    @property
    def is_adaptive(self) -> bool:
        return self.adaptive or self.variant == "asam"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "SamConfig":
        """Build from a mapping (a JSON/YAML ``sam`` section); unknown keys raise, naming them.

        RW-SAM's and LookSAM's keys given with another variant are ignored, with a warning.
        """
        if values is None:
            values = {}
        if not isinstance(values, Mapping):
            raise ValueError(f"the sam section must be a mapping of options, got {values!r}")
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"unknown key(s) {[f'sam.{k}' for k in unknown]} in the sam section; accepted: {fields}")
        variant = values.get("variant", "sam")
        ignored = sorted(k for k in values if k in foreign_fields(variant))
        if ignored:
            warnings.warn(f"{[f'sam.{k}' for k in ignored]} only apply to another sam.variant and are ignored "
                          f"with sam.variant={variant!r}", stacklevel=2)
        return cls(**values)

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``create_optimizer(self.variant, params, base=..., **these, **base_kwargs)``."""
        kwargs: dict[str, Any] = dict(rho=self.rho)
        if self.variant == "looksam":
            kwargs.update(k=self.k, alpha=self.alpha, warmup=self.warmup)
        else:
            kwargs["interval"] = self.interval
        if self.is_adaptive:
            kwargs.update(adaptive=True, eta=self.eta)
        if self.variant == "rwsam":
            kwargs.update({name: getattr(self, name) for name in RWSAM_FIELDS})
        return kwargs

    def step_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`dist_sam.sam_step` (``ascent``, ``micro_batch_size``)."""
        return dict(ascent=self.ascent, micro_batch_size=self.micro_batch_size if self.ascent == "micro" else None)

    def build_optimizer(self, params: Iterable[Any], base: Any = "sgd", **base_kwargs: Any):
        """The SAM-family optimizer this section describes, around ``base`` (a name or class)."""
        return create_optimizer(self.variant, params, base=base, **self.optimizer_kwargs(), **base_kwargs)
