"""``mu="auto"``: pick RW-SAM's finite-difference step on the first batch (SPEC.md §3).

The paper chooses ``mu`` before training by comparing finite-difference estimates with exact
per-sample gradient norms on the initial model. Here the exact reference is built from
``torch.func`` per-sample gradients ``∇f_i`` *and the same directions* ``v_k`` the estimate uses:
``ŝ_i = sqrt((1/K) Σ_k (v_kᵀ ∇f_i)²)``, the value the estimator would return without truncation or
rounding error. Comparing with ``||∇f_i||`` itself would mostly measure the Monte-Carlo noise of
``K`` directions (relative standard deviation near ``sqrt(2/K)`` for ``s_i²``), which is the same
for every ``mu`` and would drown the effect of ``mu``; that figure is still reported.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from .per_sample import has_dropout, per_sample_grad_chunks, samples_coupled, squared_norms
from .estimators import fd_norms, rademacher_directions, replay_rng

__all__ = ["MU_CANDIDATES", "MuCalibration", "calibrate_mu"]

#: Decade candidates, largest first (the first wins a tie).
MU_CANDIDATES = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


class MuCalibration(NamedTuple):
    """The outcome of :func:`calibrate_mu`.

    Attributes:
        mu: the chosen step.
        error: its median relative error against the exact same-direction value ``ŝ_i``.
        errors: that error for every candidate, ``{mu: error}``.
        norm_error: the chosen ``mu``'s median relative error against ``||∇f_i||`` (mostly the
            Monte-Carlo noise of ``K`` directions).
    """

    mu: float
    error: float
    errors: dict
    norm_error: float


def _median_relative_error(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    rel = (estimate.double() - exact.double()).abs() / exact.double().clamp_min(1e-30)
    value = torch.quantile(rel, 0.5).item()
    return value if math.isfinite(value) else math.inf


def _exact_projections(module, loss_fn, x, y, params, directions, rng_state, chunk_size):
    """``(v_kᵀ ∇f_i)`` of shape ``(K, b)`` and ``||∇f_i||²`` of shape ``(b,)``, without autocast."""
    coupled = samples_coupled(module) or has_dropout(module)  # one batch forward replays the masks
    b = x.shape[0]
    proj, norms_sq = None, None
    with torch.no_grad(), replay_rng(rng_state), torch.autocast(x.device.type, enabled=False):
        for sl, grads in per_sample_grad_chunks(module, loss_fn, x, y, params, chunk_size=chunk_size, coupled=coupled):
            sq = squared_norms(grads)
            if proj is None:
                proj = torch.zeros(len(directions), b, dtype=sq.dtype, device=sq.device)
                norms_sq = torch.zeros(b, dtype=sq.dtype, device=sq.device)
            norms_sq[sl] = sq
            for k, v in enumerate(directions):
                proj[k, sl] = sum(g.flatten(1).to(sq.dtype) @ vi.flatten().to(sq.dtype)
                                  for g, vi in zip(grads.values(), v))
    return proj, norms_sq


def calibrate_mu(
    module: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    losses: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    *,
    seed: int,
    num_directions: int = 1,
    candidates: Sequence[float] = MU_CANDIDATES,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    rng_state: tuple | None = None,
    chunk_size: int = 64,
) -> MuCalibration:
    """Choose ``mu`` among ``candidates``: the smallest median relative error wins.

    Deterministic: the directions come from ``seed``, and every candidate uses the same ones.

    Args:
        module: the unwrapped model.
        loss_fn: per-sample losses of shape ``(b,)``.
        x: the probe batch's inputs (the first ascent batch).
        y: its targets.
        losses: ``f_i(w)`` from the ascent forward.
        params: ``{name: w}`` as for :func:`~dist_sam.optim.estimators.fd_norms`.
        seed: generator seed of the directions.
        num_directions: ``K``, as in training.
        candidates: the steps to try.
        autocast: the ascent forward's autocast factory (the estimates run as in training).
        rng_state: the RNG state before the ascent forward (dropout masks).
        chunk_size: most per-sample gradients held at once.

    Returns:
        A :class:`MuCalibration`.
    """
    named = {n: w.detach() for n, w in params.items()}
    directions = list(rademacher_directions(list(named.values()), seed, num_directions))
    proj, norms_sq = _exact_projections(module, loss_fn, x, y, named, directions, rng_state, chunk_size)
    target = proj.pow(2).mean(0).sqrt()
    errors, estimates = {}, {}
    for mu in candidates:
        estimates[mu] = fd_norms(module, loss_fn, x, y, losses, named, mu, seed=seed,
                                 num_directions=num_directions, autocast=autocast, rng_state=rng_state)
        errors[mu] = _median_relative_error(estimates[mu], target)
    best = min(candidates, key=lambda m: errors[m])  # min keeps the first of equal errors
    norm_error = _median_relative_error(estimates[best], norms_sq.sqrt())
    return MuCalibration(mu=float(best), error=errors[best], errors=errors, norm_error=norm_error)
