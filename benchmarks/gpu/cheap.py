"""Sections of the lent-GPU check for the cheaper sharpness-aware steps, each timed against SAM-local.

ResNet-50, bf16 autocast, per-device batch ``sam_batch`` (128) and ``m = sam_m`` (16), one GPU:

* ``looksam``: LookSAM with a look step every 5 steps (``looksam-k5``) and its off step alone
  (``looksam-off``: one pass, the reused direction), against SGD and SAM-local;
* ``look_msam``: look-m-SAM (LookSAM whose look steps are m-SAM steps, ``looksam-b/j-k5``);
* ``msam_vmap``: m-SAM sequential (``msam-b/j``) and batched (``micro_impl="vmap"``).

Interleaved in one process (:func:`benchmarks.gpu.sections.time_variants`); ratios from one run.
"""

from __future__ import annotations

from typing import Any

from .sections import time_variants

__all__ = ["looksam", "look_msam", "msam_vmap"]


def _against_sam_local(opts: dict, device: str, variants: tuple[str, ...]) -> dict[str, Any]:
    result = time_variants(dict(opts, batch_size=opts["sam_batch"]), device, variants=("sgd", "sam-local", *variants))
    rows = result["variants"]
    for name in variants:
        if name in rows:
            for base in ("sam-local", "sgd"):
                result["ratios"][f"{name}/{base}"] = rows[name]["step_time_ms"] / rows[base]["step_time_ms"]
    result.update(m=opts["sam_m"], ok=all(r["finite"] for r in rows.values()) and not result["skipped"])
    return result


def _micro(opts: dict) -> str:
    return f"b/{opts['sam_batch'] // opts['sam_m']}"


def looksam(opts: dict, device: str, workdir: str) -> dict[str, Any]:
    """LookSAM every 5 steps and its off step alone, against SGD and SAM-local."""
    return _against_sam_local(opts, device, ("looksam-k5", "looksam-off"))


def look_msam(opts: dict, device: str, workdir: str) -> dict[str, Any]:
    """look-m-SAM (look steps are m-SAM steps at m = sam_m), against SAM-local."""
    return _against_sam_local(opts, device, (f"looksam-{_micro(opts)}-k5",))


def msam_vmap(opts: dict, device: str, workdir: str) -> dict[str, Any]:
    """m-SAM at m = sam_m, sequential and batched (vmap), against SAM-local."""
    micro = f"msam-{_micro(opts)}"
    result = _against_sam_local(opts, device, (micro, f"{micro}-vmap"))
    rows = result["variants"]
    if micro in rows and f"{micro}-vmap" in rows:
        result["ratios"]["vmap/sequential"] = rows[f"{micro}-vmap"]["step_time_ms"] / rows[micro]["step_time_ms"]
    return result
