"""Integrations with the training stacks people already use; each lives in its own subpackage.

Importing ``dist_sam`` imports none of them, and this package imports nothing: import the one you
use, e.g. ``from dist_sam.integrations.hf import SAMTrainer`` (``dist-sam[hf]``) or
``from dist_sam.integrations.lightning import SAMMixin`` (``dist-sam[lightning]``).
"""

__all__: list[str] = []
