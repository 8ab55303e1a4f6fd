"""dist-sam inside Hugging Face ``Trainer`` (``pip install 'dist-sam[hf]'``).

    from dist_sam.config import SamConfig
    from dist_sam.integrations.hf import SAMTrainer

    trainer = SAMTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                         sam=SamConfig(variant="rwsam", rho=0.05, lam=0.5))
    trainer.train()

The step is :func:`dist_sam.core.sam_passes` on the model Trainer prepared (DDP, DeepSpeed); see
:mod:`dist_sam.integrations.hf.trainer`.
"""

from .args import SAMTrainingArguments
from .batch import Batch, accept_batches
from .trainer import STATE_FILE, SAMTrainer, cross_entropy_per_sample

__all__ = ["SAMTrainer", "SAMTrainingArguments", "cross_entropy_per_sample", "Batch", "accept_batches", "STATE_FILE"]
