"""Per-sample gradient-norm estimators of RW-SAM (SPEC.md §3), as functions of a module and a batch.

* ``fd`` (the paper's eq. 21): ``s_i = sqrt((1/K) Σ_k ((f_i(w + mu·v_k) − f_i(w)) / mu)²)`` with
  Rademacher ``v_k``; one extra forward per direction, without autograd.
* ``exact``: ``||∇f_i(w)||`` from ``torch.func`` per-sample gradients.
* ``last_layer``: the closed form ``||softmax(z_i) − t_i|| · sqrt(||h_i||² + 1)`` of the final
  linear layer's per-sample gradient under cross-entropy, from its captured input ``h_i``.

The extra forwards run on the unwrapped module through ``torch.func.functional_call`` with the
perturbed weights ``w + mu·v`` as separate tensors: the module's own parameters are never written,
so they are exactly ``w`` afterwards, autograd's saved tensors of the ascent forward stay valid,
and autocast's cache of cast weights cannot serve stale copies.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from ..bn import frozen_running_stats
from .per_sample import has_dropout, per_sample_grad_chunks, samples_coupled, squared_norms

__all__ = [
    "direction_seed",
    "rademacher_directions",
    "capture_rng",
    "capture_layer",
    "final_linear",
    "replay_rng",
    "fd_norms",
    "exact_norms",
    "last_layer_norms",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def direction_seed(seed: int, step: int, rank: int, group: int = 0) -> int:
    """The generator seed of the Rademacher directions for ``(seed, step, rank, group)``.

    A splitmix64 chain over the four integers: distinct tuples give unrelated streams, and the
    same tuple gives the same stream on any machine. The result fits in 63 bits.
    """
    h = 0
    for part in (seed, step, rank, group):
        h = _splitmix64(h ^ (int(part) & _M64))
    return h >> 1


def _signs(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``n`` i.i.d. ±1 (int8): the bits of ``ceil(n/64)`` random 64-bit words, least significant
    bit of each (little-endian) byte first. One draw per 64 signs keeps the generator off the
    critical path; int8 keeps the memory traffic at one byte per parameter."""
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 63) // 64,), generator=generator, device=device, dtype=torch.int64)
    shifts = torch.arange(8, dtype=torch.uint8, device=device)
    bits = (words.view(torch.uint8).unsqueeze(1) >> shifts) & 1
    return bits.view(-1)[:n].view(torch.int8).mul_(2).sub_(1)


def rademacher_directions(params: Sequence[torch.Tensor], seed: int, num_directions: int) -> Iterator[list[torch.Tensor]]:
    """Yield ``num_directions`` directions ``v``, each a list of ±1 tensors shaped like ``params``.

    Entries are i.i.d. ±1, int8 (exact in any dtype they are added to), on each parameter's
    device. Per direction and per device, one flat draw covers that device's parameters in order,
    from a generator seeded with ``seed``; so the ``k``-th direction depends only on ``(seed, k)``
    and the parameters' shapes.
    """
    by_device: dict[torch.device, list[int]] = {}
    for i, p in enumerate(params):
        by_device.setdefault(p.device, []).append(i)
    gens = {d: torch.Generator(device=d).manual_seed(seed) for d in by_device}
    for _ in range(num_directions):
        out: list[torch.Tensor] = [None] * len(params)  # type: ignore[list-item]
        for device, idx in by_device.items():
            sizes = [params[i].numel() for i in idx]
            for i, chunk in zip(idx, _signs(sum(sizes), gens[device], device).split(sizes)):
                out[i] = chunk.view(params[i].shape)
        yield out


def capture_rng(devices: Sequence[torch.device] = ()) -> tuple:
    """The CPU RNG state and the CUDA states of ``devices``: replaying it reproduces dropout masks."""
    cuda = {d.index or 0: torch.cuda.get_rng_state(d) for d in devices if d.type == "cuda"}
    return torch.get_rng_state(), cuda


def final_linear(module: nn.Module, last_layer: str | nn.Module | None) -> nn.Linear:
    """The ``nn.Linear`` producing the logits: ``last_layer`` (a submodule or its name), else the
    model's own ``get_classifier()`` (timm's convention), else the last ``nn.Linear``."""
    if last_layer is None and callable(getattr(module, "get_classifier", None)):
        last_layer = module.get_classifier()  # timm: fc, head, head.fc; a tuple for distilled heads
        if not isinstance(last_layer, nn.Linear):
            raise ValueError(f"estimator='last_layer' needs one nn.Linear producing the logits; "
                             f"{type(module).__name__}.get_classifier() is {type(last_layer).__name__}: "
                             f"name one with last_layer=... or use estimator='fd'")
    if last_layer is None:
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"estimator='last_layer' needs a final nn.Linear producing the logits, and "
                             f"{type(module).__name__} has none; name one with last_layer=... or use estimator='fd'")
        return linears[-1]
    if isinstance(last_layer, nn.Module):
        layer = last_layer
        if not any(m is layer for m in module.modules()):
            raise ValueError("last_layer is not a submodule of the model")
    else:
        try:
            layer = module.get_submodule(last_layer)
        except AttributeError:
            raise ValueError(f"last_layer={last_layer!r} names no submodule of {type(module).__name__}") from None
    if not isinstance(layer, nn.Linear):
        raise ValueError(f"last_layer must be an nn.Linear (the closed form is for a linear layer), "
                         f"got {type(layer).__name__}")
    return layer


@contextlib.contextmanager
def capture_layer(layer: nn.Module) -> Iterator[Callable[[], tuple | None]]:
    """Record ``layer``'s forwards while inside; yields ``take()``: the latest ``(input, output, layer)``
    (detached), then forgotten. ``last_layer``'s closed form reads the final layer's input from it."""
    seen: list[tuple | None] = [None]

    def hook(mod, inputs, output):
        seen[0] = (inputs[0].detach(), output.detach(), mod)

    def take() -> tuple | None:
        value, seen[0] = seen[0], None
        return value

    handle = layer.register_forward_hook(hook)
    try:
        yield take
    finally:
        handle.remove()


@contextlib.contextmanager
def replay_rng(state: tuple | None) -> Iterator[None]:
    """Run with the RNG ``state`` of :func:`capture_rng`; the global streams are restored after."""
    if state is None:
        yield
        return
    cpu, cuda = state
    with torch.random.fork_rng(devices=list(cuda)):
        torch.set_rng_state(cpu)
        for index, s in cuda.items():
            torch.cuda.set_rng_state(s, index)
        yield


def _losses_at(module, loss_fn, x, y, named, mu, directions, autocast, rng_state, workspace) -> torch.Tensor:
    """``f_i(w + mu·v_k)`` for the given directions, shape ``(len(directions), b)``."""
    names, weights = list(named), list(named.values())
    if len(directions) == 1:
        (v,) = directions
        if workspace is None:
            moved = {n: torch.add(w, d, alpha=mu) for n, w, d in zip(names, weights, v)}
        else:
            moved = {n: torch.add(w, d, alpha=mu, out=workspace[n]) for n, w, d in zip(names, weights, v)}
        with replay_rng(rng_state), autocast():
            return loss_fn(functional_call(module, moved, (x,)), y).unsqueeze(0)
    moved = {n: torch.stack([torch.add(w, v[i], alpha=mu) for v in directions]).to(w.dtype)
             for i, (n, w) in enumerate(zip(names, weights))}
    batched = vmap(lambda p: loss_fn(functional_call(module, p, (x,)), y), randomness="same")
    with replay_rng(rng_state), autocast():
        return batched(moved)


@torch.no_grad()
def fd_norms(
    module: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    losses: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    mu: float,
    *,
    seed: int,
    num_directions: int = 1,
    chunk_size: int = 1,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    rng_state: tuple | None = None,
    workspace: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Finite-difference estimates ``s_i`` of ``||∇f_i(w)||`` (SPEC.md §3, eq. 21).

    Args:
        module: the unwrapped model (no DDP forward, so nothing communicates).
        loss_fn: per-sample losses of shape ``(b,)``.
        x: the batch's inputs.
        y: its targets.
        losses: ``f_i(w)`` from the ascent forward, reused rather than recomputed.
        params: ``{name: w}``, the perturbed parameters, in the order the directions cover them.
        mu: the finite-difference step, ``> 0``.
        seed: the directions' generator seed (see :func:`direction_seed`).
        num_directions: ``K``, the directions averaged in ``s_i²``.
        chunk_size: directions per forward; above 1 they are vectorized with ``torch.func.vmap``
            (``chunk_size`` stacked copies of the weights), at 1 each is a plain forward.
        autocast: context factory of the ascent forward, so the extra forwards match its precision.
        rng_state: :func:`capture_rng` before the ascent forward; replayed so dropout masks match.
        workspace: ``{name: tensor like w}`` to hold ``w + mu·v`` (one direction at a time), e.g.
            the optimizer's restore buffer, idle during the ascent; default: fresh tensors.

    Returns:
        ``s``, shape ``(b,)``, float32 (float64 for float64 losses). BatchNorm running statistics
        and the module's parameters are left untouched.
    """
    f0 = losses.detach()
    f0 = f0.double() if f0.dtype == torch.float64 else f0.float()
    total = torch.zeros_like(f0)
    stream = rademacher_directions([w.detach() for w in params.values()], seed, num_directions)
    named = {n: w.detach() for n, w in params.items()}
    with frozen_running_stats(module):
        for start in range(0, num_directions, chunk_size):
            batch = [next(stream) for _ in range(min(chunk_size, num_directions - start))]
            f = _losses_at(module, loss_fn, x, y, named, mu, batch, autocast, rng_state, workspace)
            total += ((f.to(f0.dtype) - f0) / mu).pow(2).sum(0)
    return (total / num_directions).sqrt()


def exact_norms(
    module: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    *,
    chunk_size: int = 64,
    rng_state: tuple | None = None,
) -> torch.Tensor:
    """``||∇f_i(w)||`` over ``params`` from ``torch.func`` per-sample gradients, shape ``(b,)``.

    See :func:`dist_sam.diagnostics.per_sample.per_sample_grad_chunks` for BatchNorm. With an
    ``rng_state`` and active dropout, one batch forward replays the ascent forward's masks.
    """
    coupled = samples_coupled(module) or (rng_state is not None and has_dropout(module))
    with torch.no_grad(), replay_rng(rng_state):
        chunks = per_sample_grad_chunks(module, loss_fn, x, y, params, chunk_size=chunk_size, coupled=coupled)
        return torch.cat([squared_norms(g).sqrt() for _, g in chunks])


def last_layer_norms(
    logits: torch.Tensor,
    features: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: bool = True,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Closed-form per-sample gradient norm of the final linear layer under cross-entropy.

    With ``z_i = W h_i + c`` and target distribution ``t_i``, ``∂f_i/∂z_i = softmax(z_i) − t_i``,
    so ``||∇_{W,c} f_i|| = ||softmax(z_i) − t_i|| · sqrt(||h_i||² + 1)`` (``+1`` for the bias).

    Args:
        logits: ``z``, shape ``(b, C)``.
        features: ``h``, the layer's input, shape ``(b, d)``.
        targets: class indices ``(b,)`` or class probabilities ``(b, C)``.
        bias: whether the layer has a bias.
        label_smoothing: as in ``nn.CrossEntropyLoss``: ``t = (1 − ε)·t + ε/C``.
        ignore_index: class-index targets equal to it have zero loss and gradient.

    Returns:
        ``s``, shape ``(b,)``, float32 (float64 for float64 logits).
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z, h = logits.detach().to(dtype), features.detach().to(dtype)
    num_classes = z.shape[1]
    keep = None
    if targets.is_floating_point():
        t = targets.detach().to(dtype)
    else:
        keep = targets != ignore_index
        t = F.one_hot(targets.where(keep, 0), num_classes).to(dtype)
    if label_smoothing:
        t = t * (1.0 - label_smoothing) + label_smoothing / num_classes
    s = (torch.softmax(z, dim=1) - t).norm(dim=1) * (h.pow(2).sum(1) + float(bias)).sqrt()
    return s if keep is None else s * keep
