"""The SAM family as ``torch.optim`` wrappers, their perturbation rules and the registry."""

from .registry import BASE_OPTIMIZERS, create_optimizer, list_optimizers, register_optimizer
from .rules import EPS_NORM, global_norm, perturbation
from .first_order import FirstOrderMSAM
from .looksam import LookSAM
from .rwsam import RWSAM, gibbs_weights
from .sam import SAM
from .variants import ASAM, USAM

__all__ = [
    "SAM",
    "USAM",
    "ASAM",
    "RWSAM",
    "LookSAM",
    "FirstOrderMSAM",
    "gibbs_weights",
    "create_optimizer",
    "list_optimizers",
    "register_optimizer",
    "BASE_OPTIMIZERS",
    "perturbation",
    "global_norm",
    "EPS_NORM",
]
