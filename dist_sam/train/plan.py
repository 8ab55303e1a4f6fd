"""The batch plan: per-worker batch and accumulation for a world size, re-planned on resume.

A run is defined by its global batch ``B = world_size * batch_size`` and its chunk ``f =
batch_size / accumulation_steps``: the samples one forward sees, i.e. the ascent group size ``m``
of local ascent (m-SAM over the chunks), the unit ``micro_batch_size`` divides under micro ascent,
and the BatchNorm batch. Data is ordered by global sample index (step ``s`` reads positions
``[s*B, (s+1)*B)`` of the epoch's order, worker ``r`` the ``r``-th slice of ``b``), so any plan
with the same ``B`` and ``f`` trains on the same samples, in the same ascent groups, each group
with the same ascent. Resuming at world size ``n'`` keeps ``B`` and ``f``: ``b' = B / n'`` and
``k' = b' / f``; it needs ``n'`` to divide ``B / f``.

Under ``ascent: micro`` the unit is ``m = micro_batch_size`` instead of ``f`` (each micro-batch is
its own ascent group and forward): any ``n'`` dividing ``B / m`` works. ``ascent: global``
perturbs with the all-reduced gradient of the per-worker forwards, so its BatchNorm batches
(``b``) change with the world size: it resumes at its own world size only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ..checkpoint import CheckpointError
from .config import TrainConfig

__all__ = ["BatchPlan", "initial_plan", "replan", "source_rank", "working_sizes", "group_size"]


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """How the global batch is split: ``world_size`` workers of ``batch_size``, in ``accumulation_steps`` chunks."""

    world_size: int
    batch_size: int
    accumulation_steps: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size

    @property
    def chunk(self) -> int:
        """Samples per forward (``m`` under local ascent)."""
        return self.batch_size // self.accumulation_steps

    def groups_per_rank(self, cfg: TrainConfig) -> int:
        """Ascent groups per worker and step: ``b / micro_batch_size`` (micro), else ``k``."""
        if cfg.sam is not None and cfg.sam.ascent == "micro":
            return self.batch_size // cfg.sam.micro_batch_size
        return self.accumulation_steps

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, tree: Mapping[str, Any]) -> "BatchPlan":
        return cls(int(tree["world_size"]), int(tree["batch_size"]), int(tree["accumulation_steps"]))


def initial_plan(cfg: TrainConfig, world_size: int) -> BatchPlan:
    """The plan of a fresh run: the config's per-worker batch and accumulation at this world size.

    Raises:
        ValueError: ``optim.accumulation_steps`` does not divide ``data.batch_size``.
    """
    b, k = cfg.data.batch_size, cfg.optim.accumulation_steps
    if b % k:
        raise ValueError(f"config key 'optim.accumulation_steps': got {k}; expected a divisor of data.batch_size={b}")
    return BatchPlan(world_size, b, k)


def group_size(saved: BatchPlan, cfg: TrainConfig) -> int:
    """The samples a resume must keep together: ``micro_batch_size`` under micro ascent (each
    micro-batch is its own ascent group and forward), else the chunk ``f`` (m-SAM's group, the BN batch)."""
    if cfg.sam is not None and cfg.sam.ascent == "micro":
        return cfg.sam.micro_batch_size
    return saved.chunk


def working_sizes(saved: BatchPlan, cfg: TrainConfig) -> list[int]:
    """The world sizes a resume of ``saved`` can run at (``ascent: global``/``full``: its own only)."""
    if cfg.sam is not None and cfg.sam.ascent in ("global", "full"):
        return [saved.world_size]
    groups = saved.global_batch // group_size(saved, cfg)
    return [n for n in range(1, groups + 1) if groups % n == 0]


def replan(saved: BatchPlan, world_size: int, cfg: TrainConfig, path: str) -> BatchPlan:
    """The plan that keeps ``saved``'s global batch and ascent groups at ``world_size``.

    Local ascent (and plain SGD) keeps the chunk ``f``: ``b' = B / n'``, ``k' = b' / f``. Micro
    ascent keeps ``m = micro_batch_size`` (its groups and forwards are the micro-batches whatever
    ``k``): ``b' = B / n'``, and ``k' = b' / f`` where ``f`` still divides ``b'`` (nothing changes),
    else ``k' = b' / m``.

    Raises:
        CheckpointError: no such plan (``world_size`` does not divide ``B / f`` -- ``B / m`` under
            micro ascent --, or ``ascent: global``/``full``), naming the world sizes that work.
    """
    if world_size == saved.world_size:
        return saved
    B, f, unit = saved.global_batch, saved.chunk, group_size(saved, cfg)
    works = ", ".join(map(str, working_sizes(saved, cfg)))
    if cfg.sam is not None and cfg.sam.ascent in ("global", "full"):
        raise CheckpointError(path, f"written at world size {saved.world_size}, running with {world_size}: "
                              f"ascent={cfg.sam.ascent!r} perturbs from per-worker forwards of batch_size, which would "
                              f"change", f"resume with world size {saved.world_size}")
    micro = cfg.sam is not None and cfg.sam.ascent == "micro"
    if B % world_size or (B // world_size) % unit:
        per = "samples per micro-batch (sam.micro_batch_size)" if micro else "samples per ascent group/forward"
        raise CheckpointError(path, f"written at world size {saved.world_size} (global batch {B}, {unit} {per}); "
                              f"world size {world_size} cannot keep both",
                              f"resume with a world size among {works} (divisors of {B // unit} = global batch / "
                              f"{'micro_batch_size' if micro else 'group size'}), or start a new run")
    b = B // world_size
    return BatchPlan(world_size, b, b // f if b % f == 0 else b // unit)


def source_rank(saved: BatchPlan, plan: BatchPlan, rank: int) -> int:
    """The saved rank that read the first samples this rank now reads (its RW-SAM ``mu`` is carried over)."""
    return (rank * plan.batch_size) // saved.batch_size
