"""The SAM step core: one loop (:mod:`.loop`) over a small per-engine interface (:mod:`.engine`).

Every engine (DDP, FSDP2, DeepSpeed; ``dist_sam.distributed``) drives the same
ascent -> perturb -> descent -> restore loop; nothing here imports ``torch.distributed``.
"""

from .engine import AscentGrads, StepEngine, WrappedModel, stepping
from .loop import LossFn, per_sample_losses, plain_passes, sam_passes
from .penalty import penalty_passes

__all__ = ["StepEngine", "WrappedModel", "AscentGrads", "sam_passes", "penalty_passes", "plain_passes", "per_sample_losses", "stepping",
           "LossFn"]
