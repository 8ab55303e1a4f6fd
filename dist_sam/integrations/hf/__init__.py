"""dist-sam inside Hugging Face ``Trainer`` (``pip install 'dist-sam[hf]'``).

    from dist_sam.config import SamConfig
    from dist_sam.integrations.hf import SAMTrainer

    trainer = SAMTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                         sam=SamConfig(variant="rwsam", rho=0.05, lam=0.5, mu=1e-3))
    trainer.train()

The step is :func:`dist_sam.core.sam_passes` on the model Trainer prepared (plain, DDP, FSDP2,
DeepSpeed ZeRO 0-3); see :mod:`dist_sam.integrations.hf.trainer`.
"""

try:
    import accelerate  # noqa: F401
    import transformers  # noqa: F401
except ImportError as err:
    raise ImportError("dist_sam.integrations.hf needs transformers and accelerate: pip install 'dist-sam[hf]'") from err

from .args import SAMTrainingArguments  # noqa: E402
from .batch import Batch, accept_batches  # noqa: E402
from .trainer import STATE_FILE, LogitsCrossEntropy, SAMTrainer, cross_entropy_per_sample  # noqa: E402

__all__ = ["SAMTrainer", "SAMTrainingArguments", "LogitsCrossEntropy", "cross_entropy_per_sample", "Batch", "accept_batches", "STATE_FILE"]
