"""Integrations with the training stacks people already use; each lives in its own subpackage.

Importing ``dist_sam`` imports none of them, and this package imports nothing: import the one you
use, e.g. ``from dist_sam.integrations.hf import SAMTrainer`` (needs ``pip install 'dist-sam[hf]'``).
"""

__all__: list[str] = []
