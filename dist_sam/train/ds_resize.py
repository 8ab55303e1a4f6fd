"""A DeepSpeed run resumed at another world size, through DeepSpeed's universal checkpoint.

Under ``--deepspeed`` the batch plan (:mod:`.plan`) is DeepSpeed's: a worker reads ``b = f * k``
samples per optimizer step, ``f = train_micro_batch_size_per_gpu`` (``data.batch_size``: the
forward, m under local ascent) and ``k = gradient_accumulation_steps``. A resume at world size
``n'`` keeps the global batch and ``f`` (:func:`.plan.replan`): 2 workers x micro 8 become 1
worker x micro 8 x ``gradient_accumulation_steps`` 2.

What DeepSpeed 0.19.8 can load at another data-parallel size:

* ZeRO-0 in fp32: the engine's ``mp_rank_00_model_states.pt`` holds the whole module and the
  whole base-optimizer state; it loads as it is.
* ZeRO-1/2: the optimizer states are partitioned per data-parallel rank, and
  ``engine._load_zero_checkpoint`` refuses another size (``deepspeed/runtime/engine.py:4748``).
  The newest tag is converted once, on rank 0 while the others wait, with DeepSpeed's own
  ``deepspeed/checkpoint/ds_to_universal.py`` into ``<tag>/universal`` (written under a
  temporary name, then renamed: a conversion cut short is redone), and the engine is built with
  ``checkpoint.load_universal`` to load it. The original tag is left as it was; the converted
  copy goes with its tag when ``checkpoint.keep_last`` prunes it.
* ZeRO-3: the same conversion (``ds_to_universal.py:1277``, its stage-3 path) and
  ``checkpoint.load_universal``; stage 3's loader (``deepspeed/runtime/zero/stage3.py:3664-3665``)
  restores the fp32 partitions, ``exp_avg`` and ``exp_avg_sq`` and the ``step``, nothing else. The
  engine's client state is in every rank's ``zero_pp_rank_<r>_mp_rank_00_model_states.pt``
  (:data:`MODEL_FILES`).
* Refused before any work (:func:`check_resizable`): ZeRO-1/2/3 with a base optimizer other than
  Adam/AdamW (``ds_to_universal.py:154`` and, at ZeRO-3, ``:196`` read ``exp_avg`` and
  ``exp_avg_sq``: SGD's ``momentum_buffer`` is a ``KeyError``), and ZeRO-0 in bf16 (its
  ``BF16_Optimizer`` writes partitioned states that ``engine.load_checkpoint`` loads only under
  ZeRO, ``engine.py:4455``).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from typing import Any

import torch

from ..checkpoint import CheckpointError
from .faults import agree_on_write, attempt_write

__all__ = ["read_tag", "check_resizable", "resize_config", "to_universal", "UNIVERSAL", "ADAM_STATES"]

log = logging.getLogger("dist_sam.train")
UNIVERSAL = "universal"  # the converted copy, inside the tag it was made from
# the engine's client state: one file below ZeRO-3, one per rank (each with the client state) at ZeRO-3
MODEL_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def read_tag(directory: str) -> tuple[str | None, dict[str, Any] | None]:
    """``(tag path, saved state)`` of the newest DeepSpeed tag in ``directory`` (its ``latest``), or
    ``(None, None)``: the client state the trainer wrote, read before any engine exists (the batch
    plan decides the loaders). Raises ``CheckpointError`` naming the file if it cannot be read."""
    latest = os.path.join(directory, "latest")
    if not os.path.isfile(latest):
        return None, None
    with open(latest) as fh:
        path = os.path.join(directory, fh.read().strip())
    model_file = next((f for f in (os.path.join(path, n) for n in MODEL_FILES) if os.path.isfile(f)),
                      os.path.join(path, MODEL_FILES[0]))
    try:
        state = torch.load(model_file, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as err:
        raise CheckpointError(model_file, f"cannot be read ({err})", "restore it, or set checkpoint.resume=never") from err
    if "position" not in state:
        raise CheckpointError(model_file, "holds no training position (not written by launch/train.py --deepspeed)")
    return path, state


def _stage(config: dict[str, Any]) -> int:
    return (config.get("zero_optimization") or {}).get("stage", 0)


ADAM_STATES = ("adam", "adamw")  # the base optimizers whose ZeRO-1/2/3 states ds_to_universal converts
_WORKS = "ZeRO-0 in fp32 (any base optimizer) and ZeRO-1/2/3 with optim.base adam or adamw"


def check_resizable(config: dict[str, Any], base: str, saved_world_size: int, world_size: int, path: str) -> None:
    """Refuse, before any work, a change of world size DeepSpeed 0.19.8 cannot load.

    Args:
        base: the base optimizer's name (``optim.base``, or the JSON's ``optimizer.type``).

    Raises:
        CheckpointError: ZeRO-0 with bf16; ZeRO-1/2/3 with a base optimizer whose state is not
            Adam's (naming the stages and optimizers that work).
    """
    bf16 = bool((config.get("bf16") or {}).get("enabled", False))
    where = f"written at world size {saved_world_size}, running with {world_size}: "
    if _stage(config) == 0 and bf16:
        raise CheckpointError(path, where + "DeepSpeed 0.19.8 does not reload ZeRO-0 bf16 optimizer states at another "
                              "world size (deepspeed/runtime/engine.py:4455 loads them under ZeRO only)",
                              f"resume with world size {saved_world_size}; {_WORKS} resume at any world size the "
                              "batch plan allows")
    if _stage(config) in (1, 2, 3) and base.lower() not in ADAM_STATES:
        stage = _stage(config)
        lines = "ds_to_universal.py:196 and stage3.py:3665" if stage == 3 else "ds_to_universal.py:154"
        raise CheckpointError(path, where + f"DeepSpeed 0.19.8's universal checkpoint converts Adam's ZeRO-{stage} "
                              f"states only (deepspeed/checkpoint/{lines} read exp_avg, exp_avg_sq), not {base}'s",
                              f"resume with world size {saved_world_size}; {_WORKS} resume at any world size the "
                              "batch plan allows")


def resize_config(config: dict[str, Any], micro: int, accumulation_steps: int, universal: bool) -> dict[str, Any]:
    """The engine config of a re-planned run: the plan's micro-batch and accumulation, and, after a
    change of world size under ZeRO-1/2/3, ``checkpoint.load_universal``."""
    config = {**config, "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accumulation_steps}
    if universal and _stage(config) in (1, 2, 3):
        config["checkpoint"] = {**(config.get("checkpoint") or {}), "load_universal": True}
    return config


def _convert(path: str, target: str) -> None:
    from deepspeed.checkpoint import ds_to_universal

    scratch = target + ".tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    args = argparse.Namespace(input_folder=path, output_folder=scratch, num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # the module carries no universal_checkpoint_info
    log.info("converting %s to DeepSpeed's universal checkpoint format (%s)", path, target)
    ds_to_universal.main(args)
    os.rename(scratch, target)


def to_universal(path: str, config: dict[str, Any], primary: bool, step: int) -> tuple[str, str]:
    """``(load_dir, tag)`` for ``engine.load_checkpoint``: ``path`` itself at ZeRO-0, else its
    universal copy, converted by rank 0 if not there yet (a collective: every rank waits for it).

    Raises:
        CheckpointWriteError: on every rank, if the conversion failed (exit 74, as a failed write).
    """
    head, tag = os.path.split(path)
    if _stage(config) == 0:
        return head, tag
    target = os.path.join(path, UNIVERSAL)
    failure = None
    if primary and not os.path.isdir(target):
        failure = attempt_write(lambda: _convert(path, target), target)[1]
    agree_on_write(failure, step, what=target)
    return path, UNIVERSAL
