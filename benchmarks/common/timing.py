"""Timing plumbing: interleaved rounds, round-paired ratios, step-time statistics, peak memory.

On a shared machine a slow spell hits whatever runs during it. The benchmarks interleave the
variants (each round runs every variant in turn, the order rotating per round, :func:`rotated`)
and quote ratios paired within a round (:func:`paired_ratio`), never absolute times.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable, Sequence

import torch

__all__ = ["PeakMemory", "rotated", "paired_ratio", "stats"]


def rotated(names: Sequence[str], round_index: int) -> list[str]:
    """``names`` starting at ``round_index`` (mod its length): round ``r``'s order of the variants."""
    k = round_index % len(names)
    return list(names[k:]) + list(names[:k])


def paired_ratio(times: Sequence[float], base: Sequence[float], per_round: int) -> float:
    """Median over rounds of (mean step of ``times`` / mean step of ``base`` in the same round):
    a slow spell of a shared machine cancels when it spans both."""
    rounds = range(0, min(len(times), len(base)), per_round)
    return statistics.median(statistics.mean(times[i:i + per_round]) / statistics.mean(base[i:i + per_round])
                             for i in rounds)


def stats(ts: Sequence[float]) -> dict[str, float]:
    """Median, 10th and 90th percentiles, minimum and count of step times."""
    q = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) > 1 else [ts[0]] * 9
    return dict(median=statistics.median(ts), p10=q[0], p90=q[-1], min=min(ts), n=len(ts))


class PeakMemory:
    """Peak extra memory of one call, and how it was measured (:attr:`method`).

    CUDA: ``max_memory_allocated`` minus ``memory_allocated`` before the call. Linux CPU: the
    kernel's peak-RSS mark (``VmHWM``) minus ``VmRSS`` before the call, after ``malloc_trim(0)``
    returned freed heap to the OS and the mark was reset (``/proc/self/clear_refs`` = 5); this
    counts every page the call touches (tensors, allocator overhead), not only tensor bytes.
    Elsewhere: ``None``.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._trim = None
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated() - memory_allocated() before the step"
        elif self._linux_probe():
            self.method = "VmHWM - VmRSS before the step (Linux; malloc_trim(0) and clear_refs=5 first)"
        else:
            self.method = None

    def _linux_probe(self) -> bool:
        try:
            import ctypes

            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            return self._status("VmHWM") is not None
        except (OSError, AttributeError):
            return False

    @staticmethod
    def _status(key: str) -> int | None:
        with open("/proc/self/status") as fh:
            return next((int(line.split()[1]) * 1024 for line in fh if line.startswith(key + ":")), None)

    def measure(self, fn: Callable[[], Any]) -> int | None:
        """Run ``fn()``; return its peak extra memory in bytes (``None`` without a method)."""
        if self.method is None:
            fn()
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - before
        import gc

        gc.collect()
        self._trim(0)
        before = self._status("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        fn()
        return max(0, self._status("VmHWM") - before)
