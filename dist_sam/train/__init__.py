"""Training loop, demo and entry points built on :func:`dist_sam.sam_step`."""
