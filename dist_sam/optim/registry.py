"""Optimizer registry and factory, in the manner of ``timm.optim.create_optimizer``."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from .first_order import FirstOrderMSAM
from .looksam import LookSAM
from .sam import SAM
from .variants import ASAM, USAM

__all__ = ["create_optimizer", "list_optimizers", "register_optimizer", "BASE_OPTIMIZERS"]

#: Base optimizers reachable by name; any ``torch.optim.Optimizer`` class is accepted too.
BASE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
}

_REGISTRY: dict[str, Callable[..., SAM]] = {"sam": SAM, "usam": USAM, "asam": ASAM, "looksam": LookSAM,
                                          "msam-fo": FirstOrderMSAM}


def register_optimizer(name: str, factory: Callable[..., SAM]) -> None:
    """Make ``create_optimizer(name, ...)`` build ``factory(params, base_cls, **kwargs)``."""
    _REGISTRY[name.lower()] = factory


def list_optimizers() -> list[str]:
    """Names accepted by :func:`create_optimizer`, sorted."""
    return sorted(_REGISTRY)


def create_optimizer(
    name: str, params: Iterable[Any], base: str | type[torch.optim.Optimizer] = "sgd", **kwargs: Any
) -> SAM:
    """Build a SAM-family optimizer by name.

    Args:
        name: one of :func:`list_optimizers` (``sam``, ``usam``, ``asam``, ``rwsam``, ``looksam``,
            ``msam-fo``: first-order m-SAM).
        params: parameters or param-group dicts.
        base: base optimizer, a name in ``BASE_OPTIMIZERS`` or an optimizer class.
        **kwargs: SAM options (``rho``, ``interval``, RW-SAM's ``lam``, LookSAM's ``k``, ``alpha``,
            ``warmup``...) and the base
            optimizer's options (``lr``, ``momentum``, ``weight_decay``...).

    Example:
        >>> opt = create_optimizer("sam", model.parameters(), base="sgd", lr=0.1, momentum=0.9, rho=0.05)
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ValueError(f"unknown optimizer name {name!r}; accepted: {list_optimizers()}")
    if isinstance(base, str):
        if base.lower() not in BASE_OPTIMIZERS:
            raise ValueError(f"unknown base optimizer {base!r}; accepted: {sorted(BASE_OPTIMIZERS)} or an Optimizer class")
        base = BASE_OPTIMIZERS[base.lower()]
    return _REGISTRY[key](params, base, **kwargs)
