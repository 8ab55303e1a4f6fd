"""Perturbation rules of the SAM family (SPEC.md §1) and RW-SAM's weights (§3), as pure functions.

Each perturbation rule maps the ascent gradient ``g`` (and, for ASAM, the weights ``w``) to the
perturbation ``e`` that is added to ``w`` before the descent pass; :func:`gibbs_weights` maps
RW-SAM's per-sample estimates to the ascent loss's weights. Nothing here touches parameters in
place, talks to other processes, or knows about optimizers.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

__all__ = ["EPS_NORM", "NORMALIZATIONS", "global_norm", "perturbation", "perturbation_scales", "gibbs_weights"]

#: Floor added to a norm before dividing by it (SPEC.md notation ``eps_norm``).
EPS_NORM = 1e-12

PerParam = Union[float, Sequence[float]]

#: RW-SAM's normalizations of the estimates before the softmax (SPEC.md §3, step 3).
NORMALIZATIONS = ("zscore", "mean", "none")
_EPS = 1e-12  # floor of the normalizations' denominators (SPEC.md §3, step 3)


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Euclidean norm of all ``tensors`` taken together, in float32 or wider.

    Args:
        tensors: tensors of any shape and floating dtype.

    Returns:
        A 0-dim tensor of dtype ``float32`` (``float64`` if any input is ``float64``) on the device
        of the first tensor.
    """
    if not tensors:
        return torch.zeros(())
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    device = tensors[0].device
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    norms = [n.to(device) for ts in by_device.values() for n in torch._foreach_norm(ts, 2, dtype=dtype)]
    return torch.linalg.vector_norm(torch.stack(norms))


def _per_param(value: PerParam, n: int) -> list[float]:
    return [float(value)] * n if isinstance(value, (int, float)) else [float(v) for v in value]


def perturbation(
    grads: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    *,
    rho: PerParam,
    adaptive: bool = False,
    eta: PerParam = 0.0,
    normalize: bool = True,
    inplace: bool = False,
    grad_norm: torch.Tensor | None = None,
    norm_fn=global_norm,
) -> list[torch.Tensor]:
    """The ascent step ``e`` for every parameter.

    * SAM:  ``e = rho * g / (||g|| + eps)``
    * USAM: ``e = rho * g``                                     (``normalize=False``)
    * ASAM: ``T = |w| + eta``; ``e = rho * T² ⊙ g / (||T ⊙ g|| + eps)``  (``adaptive=True``)

    The norm is one global norm over all ``grads`` together, taken in float32 or wider.

    Args:
        grads: ascent gradients ``g``, one per parameter.
        params: the current (unperturbed) weights ``w``, aligned with ``grads``.
        rho: perturbation radius, one for all or one per parameter (param groups may differ).
        adaptive: use ASAM's elementwise scale ``T``.
        eta: ASAM's offset in ``T = |w| + eta``, one for all or one per parameter.
        normalize: divide by the (scaled) global gradient norm; ``False`` gives USAM.
        inplace: SAM and USAM may scale ``grads`` in place and return them (no new memory);
            for callers that own ``grads``.
        grad_norm: ``||g||`` if the caller already has it (SAM reuses it; ASAM ignores it).
        norm_fn: the global norm of a list of tensors; a sharded caller passes one that reduces
            across shards (the tensors are then each rank's local shards).

    Returns:
        One tensor per parameter, in the parameter's dtype.
    """
    n = len(grads)
    rhos = _per_param(rho, n)
    if not adaptive:
        scales = perturbation_scales(grads, rho=rhos, normalize=normalize, grad_norm=grad_norm, norm_fn=norm_fn)
        if inplace and all(g.dtype == p.dtype for g, p in zip(grads, params)):
            if len({id(s) for s in scales}) == 1:
                torch._foreach_mul_(list(grads), scales[0])  # one pass
            else:
                torch._foreach_mul_(list(grads), scales)
            return list(grads)
        return [(g.to(s.dtype) * s).to(p.dtype) for g, s, p in zip(grads, scales, params)]
    t = [p.detach().abs().add(eta_i) for p, eta_i in zip(params, _per_param(eta, n))]  # T = |w| + eta
    scaled = [ti * g for ti, g in zip(t, grads)]  # T ⊙ g
    direction = [ti * s for ti, s in zip(t, scaled)]  # T² ⊙ g
    if not normalize:
        return [(r * d).to(p.dtype) for r, d, p in zip(rhos, direction, params)]
    inv_norm = 1.0 / (norm_fn(scaled) + EPS_NORM)  # float32 or wider
    return [(d.to(inv_norm.dtype) * (r * inv_norm.to(d.device))).to(p.dtype) for r, d, p in zip(rhos, direction, params)]


def perturbation_scales(
    grads: Sequence[torch.Tensor],
    *,
    rho: PerParam,
    normalize: bool = True,
    grad_norm: torch.Tensor | None = None,
    norm_fn=global_norm,
) -> list[torch.Tensor]:
    """SAM's and USAM's ``e_i = s_i · g_i`` as the factors ``s_i`` (0-dim, float32 or wider, on
    each gradient's device; one tensor object per distinct ``rho``).

    ``s_i = rho_i / (||g|| + eps)`` (SAM) or ``rho_i`` (USAM, ``normalize=False``), so a caller can
    write ``w + s_i · g_i`` in one fused pass (:meth:`dist_sam.SAM.perturb`). Arguments as
    :func:`perturbation`.
    """
    rhos = _per_param(rho, len(grads))
    if normalize:
        norm = norm_fn(list(grads)) if grad_norm is None else grad_norm
        inv = 1.0 / (norm + EPS_NORM)  # float32 or wider
    else:
        dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
        inv = torch.ones((), dtype=dtype, device=grads[0].device if grads else None)
    cache: dict[tuple, torch.Tensor] = {}
    out = []
    for r, g in zip(rhos, grads):
        key = (r, g.device)
        if key not in cache:
            cache[key] = (r * inv).to(g.device)
        out.append(cache[key])
    return out


def gibbs_weights(s: torch.Tensor, lam: float, normalization: str = "zscore") -> torch.Tensor:
    """RW-SAM's weights ``a_i = b·softmax(lam·z)_i`` (mean 1) from the estimates ``s`` (SPEC.md §3).

    Args:
        s: per-sample gradient-norm estimates, shape ``(b,)``.
        lam: the temperature ``lam >= 0``.
        normalization: ``zscore`` (``(s − mean) / (std + 1e-12)``, Bessel's ``std``), ``mean``
            (``s / (mean + 1e-12)``) or ``none``.

    Returns:
        ``a``, shape ``(b,)``, summing to ``b``; float32 (float64 for float64 ``s``).
    """
    s = s.detach().double() if s.dtype == torch.float64 else s.detach().float()
    if normalization == "zscore":
        z = (s - s.mean()) / (s.std() + _EPS) if s.numel() > 1 else torch.zeros_like(s)
    elif normalization == "mean":
        z = s / (s.mean() + _EPS)
    elif normalization == "none":
        z = s
    else:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    t = lam * z
    e = (t - t.max()).exp()  # max-shift: exp never overflows
    return s.numel() * e / e.sum()
