"""The SAM family as ``torch.optim`` wrappers, their perturbation rules and the registry."""

from .registry import BASE_OPTIMIZERS, create_optimizer, list_optimizers, register_optimizer
from .rules import EPS_NORM, global_norm, perturbation
from .looksam import LookSAM
from .rwsam import RWSAM, gibbs_weights
from .sam import ASAM, SAM, USAM

__all__ = [
    "SAM",
    "USAM",
    "ASAM",
    "RWSAM",
    "LookSAM",
    "gibbs_weights",
    "create_optimizer",
    "list_optimizers",
    "register_optimizer",
    "BASE_OPTIMIZERS",
    "perturbation",
    "global_norm",
    "EPS_NORM",
]
