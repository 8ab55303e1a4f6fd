"""SAM's thin variants (SPEC.md §1): the same optimizer with another perturbation rule by default."""

from __future__ import annotations

from typing import Any

from .sam import SAM

__all__ = ["USAM", "ASAM"]


class USAM(SAM):
    """Unnormalized SAM: ``e = rho * g`` (``normalize=False``)."""

    def __init__(self, params, base_optimizer, rho: float = 0.05, **kwargs: Any) -> None:
        kwargs.setdefault("normalize", False)
        super().__init__(params, base_optimizer, rho=rho, **kwargs)


class ASAM(SAM):
    """Adaptive SAM (Kwon et al. 2021): ``e = rho * T² g / ||T g||`` with ``T = |w| + eta``."""

    def __init__(self, params, base_optimizer, rho: float = 0.5, eta: float = 0.01, **kwargs: Any) -> None:
        kwargs.setdefault("adaptive", True)
        super().__init__(params, base_optimizer, rho=rho, eta=eta, **kwargs)
