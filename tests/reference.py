"""Independent float64 re-derivations of SPEC.md, written with plain PyTorch.

Nothing here imports ``dist_sam``: the tests compare the library against these.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def make_mlp(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


def make_cnn(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 5 * 5, 3),
    ).to(dtype)


def make_batch(model_kind: str, n: int, seed: int = 1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    if model_kind == "mlp":
        return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)
    return torch.randn(n, 2, 5, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers()}


def ref_perturbation(grads, params, *, variant: str, rho: float, eta: float = 0.0):
    """SPEC.md §1, term by term."""
    if variant == "sam":
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        return [rho * g / (norm + 1e-12) for g in grads]
    if variant == "usam":
        return [rho * g for g in grads]
    if variant == "asam":
        T = [w.abs() + eta for w in params]
        norm = torch.sqrt(sum(((t * g).double() ** 2).sum() for t, g in zip(T, grads)))
        return [rho * t * t * g / (norm + 1e-12) for t, g in zip(T, grads)]
    raise ValueError(variant)


def ref_ascent_grad(model, loss_fn, x, y, weights=None):
    """Gradient of the (optionally weighted) mean loss at w; this forward updates BN stats."""
    params = [p for p in model.parameters()]
    losses = loss_fn(model(x), y)
    obj = losses.mean() if weights is None else (weights * losses).mean()
    return list(torch.autograd.grad(obj, params)), losses.detach()


def ref_descent_grad(model, loss_fn, x, y):
    """Gradient of the mean loss; BN buffers are put back afterwards (no second update)."""
    saved = bn_buffers(model)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(loss_fn(model(x), y).mean(), params)
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(saved[k])
    return list(grads)


def ref_msam_grad(model, loss_fn, x, y, *, m: int, variant: str, rho: float, eta: float = 0.0, weight_fn=None):
    """m-SAM (SPEC §2): for each micro-batch of m samples in order, perturb from its own ascent
    gradient, take the descent gradient there, restore; average the descent gradients."""
    params = list(model.parameters())
    c = x.shape[0] // m
    total = [torch.zeros_like(p) for p in params]
    for j in range(c):
        xj, yj = x[j * m:(j + 1) * m], y[j * m:(j + 1) * m]
        w = weight_fn(model, xj, yj) if weight_fn is not None else None
        g, _ = ref_ascent_grad(model, loss_fn, xj, yj, w)
        e = ref_perturbation(g, [p.detach() for p in params], variant=variant, rho=rho, eta=eta)
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, ei in zip(params, e):
                p.add_(ei)
        h = ref_descent_grad(model, loss_fn, xj, yj)
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        for t, hi in zip(total, h):
            t.add_(hi / c)
    return total


def ref_base_step(model, base_opt, grads):
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    base_opt.step()
    base_opt.zero_grad(set_to_none=True)


def clone_model(model):
    return copy.deepcopy(model)


# -- RW-SAM (SPEC.md §3) and diagnostics (§4) ---------------------------------------------------
def ref_per_sample_grads(model, loss_fn, x, y, params=None):
    """``∇f_i(w)`` for every i by a loop of autograd.grad over one batch forward (BN put back)."""
    params = list(model.parameters()) if params is None else list(params)
    saved = bn_buffers(model)
    losses = loss_fn(model(x), y)
    grads = [torch.autograd.grad(losses[i], params, retain_graph=True) for i in range(x.shape[0])]
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(saved[k])
    return [[g.detach().double() for g in gi] for gi in grads]


def ref_gibbs_weights(s, lam: float, normalization: str):
    """SPEC §3 steps 3-4 in float64, term by term: a_i = b * exp(lam z_i) / sum_j exp(lam z_j)."""
    s = [float(v) for v in s]
    b = len(s)
    mean = sum(s) / b
    if normalization == "zscore":
        std = (sum((v - mean) ** 2 for v in s) / (b - 1)) ** 0.5
        z = [(v - mean) / (std + 1e-12) for v in s]
    elif normalization == "mean":
        z = [v / (mean + 1e-12) for v in s]
    else:
        z = list(s)
    top = max(lam * v for v in z)
    e = [math.exp(lam * v - top) for v in z]
    return torch.tensor([b * v / sum(e) for v in e], dtype=torch.float64)


def ref_fd_estimates(model, loss_fn, x, y, directions, mu: float):
    """SPEC §3 step 2: s_i = sqrt(mean_k ((f_i(w + mu v_k) - f_i(w)) / mu)^2), on a throwaway copy."""
    probe = copy.deepcopy(model)
    with torch.no_grad():
        f0 = loss_fn(probe(x), y).double()
        w = [p.detach().clone() for p in probe.parameters()]
        total = torch.zeros_like(f0)
        for v in directions:
            for p, wi, vi in zip(probe.parameters(), w, v):
                p.copy_(wi + mu * vi.to(wi.dtype))
            total += ((loss_fn(probe(x), y).double() - f0) / mu) ** 2
    return (total / len(directions)).sqrt()


def ref_sgn_covariance_trace(per_sample):
    """SPEC §4: (1/|S|) sum_i ||g_i - mean_j g_j||^2 from a list of per-sample gradient lists."""
    n = len(per_sample)
    mean = [sum(g[k] for g in per_sample) / n for k in range(len(per_sample[0]))]
    return sum(sum(((gk - mk) ** 2).sum() for gk, mk in zip(g, mean)) for g in per_sample).item() / n
