"""dist-sam: Sharpness-Aware Minimization for data-parallel training.

The ascent pass runs device-locally, before the gradient all-reduce (m = per-device batch), so a
SAM step costs one all-reduce, as SGD. See ``README.md`` and ``../shared/docs/SPEC.md``.
"""

from . import diagnostics
from .bn import frozen_running_stats
from .optim import ASAM, RWSAM, SAM, USAM, FirstOrderMSAM, LookSAM, create_optimizer, list_optimizers
from .step import ASCENT_MODES, base_step, sam_step

__version__ = "0.1.0"

__all__ = [
    "SAM",
    "USAM",
    "ASAM",
    "RWSAM",
    "LookSAM",
    "FirstOrderMSAM",
    "diagnostics",
    "create_optimizer",
    "list_optimizers",
    "sam_step",
    "base_step",
    "ASCENT_MODES",
    "frozen_running_stats",
    "__version__",
]
