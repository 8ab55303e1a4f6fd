"""Training entry points built on :func:`dist_sam.sam_step`: ``launch/train.py`` and ``make demo``.

- ``config``: ``TrainConfig``, YAML + ``section.key=value`` overrides, validated up front.
- ``loop``: ``Trainer`` (DDP, per-epoch evaluation, ``summary.json``); ``saving``: its checkpoints;
  ``resume``: which checkpoint to resume from, agreed by all ranks, damaged ones skipped.
- ``plan``: per-worker batch and accumulation, re-planned on a resume at another world size.
- ``preempt``: stop signals, agreed across ranks after the step in flight (exit status 75).
- ``steps``: the optimizer from ``create_optimizer`` and the training step (SAM family or plain SGD).
- ``models``, ``schedule`` (warmup + cosine), ``metrics`` (top-1/top-5, timing, TensorBoard),
  ``state`` (RNG and per-rank state), ``ds`` (``--deepspeed``), ``cli``, ``demo``.
"""
