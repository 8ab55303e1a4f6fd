"""LookSAM (Liu et al., CVPR 2022): SAM's direction reused between full SAM steps, and look-m-SAM.

Notation of SPEC.md (``||.||`` over all parameters at once, float32 or wider; ``eps_norm = 1e-12``).
At ``w``, ``g`` is the plain gradient and ``g_s`` SAM's descent gradient (``h`` of SPEC.md §1).

**Look steps** (``t < warmup`` or ``t % k == 0``, ``t`` the optimizer-step counter): a full SAM
step, ``base.step(g_s)``, that also stores the component of ``g_s`` orthogonal to ``g``::

    g_v = g_s - (<g_s, g> / ||g||^2) g        (g_v = g_s where g = 0)

**Off steps** (the others): one forward and backward at ``w``, gradient ``g``, and::

    base.step(g + alpha * (||g|| / (||g_v|| + eps_norm)) * g_v)

where ``g`` is the gradient the base optimizer would step with (after clipping, if any).

Data parallelism (n workers, SPEC.md §2): the ascent stays device-local (``ascent="local"``, or
m-SAM with ``ascent="micro"``: *look-m-SAM*). ``g_s`` is the synced descent gradient, and ``g``
on a look step is the mean over the ranks of their ascent gradients, synced by one extra
all-reduce on look steps only; ``g_v`` is thus the same on every rank. With ``ascent="micro"``
a rank's ascent gradients are those of its ``c`` micro-batches, and its plain gradient at ``w`` is
their mean ``(1/c) sum_j g_{B_j}(w)``: for equal micro-batches and a mean loss this is exactly
``g_{B}(w)``, the rank's batch gradient at ``w``. An off step is SGD's step: one pass, one
reduction, the same bytes. Under sharded engines (FSDP2, ZeRO-1/2) ``g_v`` is kept in the
gradient's own shards and its inner products take two more all-reduces of one or two scalars
on look steps; off steps reuse the gradient norm the engine already takes.

``rho = 0`` gives ``g_s = g``: where both come out bit-equal (one process; DDP at 2 ranks, tested)
``g_v = 0`` exactly and every step is the base optimizer's; elsewhere ``g_v`` is rounding noise
that the off steps would reuse at full weight ``alpha * ||g||``, so take the SGD baseline from
:func:`dist_sam.base_step`, not from ``rho = 0``. ``alpha``:
the published 0.7 left a held-out task at chance on 2 of 5 seeds (SGD, momentum 0.9, k = 2);
0.3 trained on every seed tried, hence the default. ``warmup`` full SAM steps first is a
stabilizer for larger ``alpha``.

``state_dict()`` holds the base optimizer's state, the step counter and ``g_v`` with its norm, so
a resumed run takes the same steps bit for bit.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch

from .rules import EPS_NORM, global_norm
from .sam import SAM

__all__ = ["LookSAM", "orthogonal_component", "reuse_"]

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """``<a, b>`` over every tensor: per tensor in float32 or wider, summed in float64."""
    def wide(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1) if t.dtype in (torch.float32, torch.float64) else t.reshape(-1).float()
    terms = [torch.dot(wide(x), wide(y).to(wide(x).dtype)).double() for x, y in zip(a, b)]
    return torch.stack(terms).sum() if terms else torch.zeros((), dtype=torch.float64)


@torch.no_grad()
def orthogonal_component(g_s: Sequence[torch.Tensor], g: Sequence[torch.Tensor],
                         reduce: Reduce = _identity) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``g_v = g_s - (<g_s, g> / ||g||^2) g`` and ``||g_v||`` (float64, 0-dim).

    ``reduce`` sums float64 partial sums across the shards of a sharded gradient (identity for
    whole tensors): once for ``(<g_s, g>, ||g||^2)``, once for ``||g_v||^2``, which is taken from
    ``g_v`` itself, so the reused term's norm is ``alpha * ||g||`` at most, whatever the rounding.
    """
    device = g_s[0].device if g_s else torch.device("cpu")
    dot, gg = reduce(torch.stack([_dot(g_s, g), _dot(g, g)]).to(device)).unbind()
    coef = torch.where(gg > 0, dot / gg, torch.zeros_like(gg))  # no floor: g_s == g gives g_v == 0 exactly
    g_v = [s - coef.to(s.dtype) * t for s, t in zip(g_s, g)]
    return g_v, reduce(_dot(g_v, g_v).reshape(1).to(device))[0].sqrt()


@torch.no_grad()
def reuse_(grads: Sequence[torch.Tensor], g_v: Sequence[torch.Tensor], g_v_norm: torch.Tensor,
           grad_norm: torch.Tensor, alpha: float) -> None:
    """``grads <- grads + alpha * (||g|| / (||g_v|| + eps)) * g_v`` in place (``grad_norm = ||g||``)."""
    scale = alpha * grad_norm.double() / (g_v_norm.double() + EPS_NORM)
    cast: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}  # once per device and dtype, not per tensor
    for t, v in zip(grads, g_v):
        key = (t.device, t.dtype)
        if key not in cast:
            cast[key] = scale.to(*key)
        t.addcmul_(v, cast[key])  # one fused pass, no host sync


class LookSAM(SAM):
    """SAM every ``k`` steps; in between, one pass and the stored SAM direction ``g_v`` reused.

    Args:
        params: as :class:`~dist_sam.SAM`.
        base_optimizer: an optimizer class or instance, as :class:`~dist_sam.SAM`.
        rho: the look steps' perturbation radius, ``>= 0``.
        k: a look step every ``k`` optimizer steps (``k = 1``: SAM), an integer ``>= 1``.
        alpha: weight of the reused direction, a number in ``[0, 1]``.
        warmup: the first ``warmup`` steps are all look steps (a stabilizer), an integer ``>= 0``.
        **kwargs: :class:`~dist_sam.SAM`'s options (``adaptive``, ``eta``, ``normalize``) and
            the base optimizer's (``lr``, ``momentum``...). ``interval`` is ``k`` here.

    The step core (:func:`dist_sam.sam_step`, DeepSpeed's ``train_step``) runs look steps as SAM
    steps (``should_perturb()``) and off steps as plain steps; ``step(closure)`` works too.
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, k: int = 5, alpha: float = 0.3,
                 warmup: int = 0, **kwargs: Any) -> None:
        for name, value, low in (("k", k, 1), ("warmup", warmup, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
        if "interval" in kwargs:
            raise ValueError(f"interval={kwargs['interval']!r}: LookSAM takes k (its look-step period), not interval")
        super().__init__(params, base_optimizer, rho=rho, **kwargs)
        self.k, self.alpha, self.warmup = k, float(alpha), warmup
        self.g_v: list[torch.Tensor] | None = None  # in the layout of the gradients the base steps with
        self.g_v_norm: torch.Tensor | None = None
        self._ascent_sum: list[torch.Tensor | None] | None = None  # (1/c) sum_j g_j over this look step
        self._plain: list[torch.Tensor] | None = None  # synced g at w, in the gradients' layout
        self._view: tuple[Any, torch.Tensor | None] | None = None  # (engine, ||g||) inside stepping_with

    def should_perturb(self) -> bool:
        """Whether the coming step is a look step (a full SAM step)."""
        return self.num_steps < self.warmup or self.num_steps % self.k == 0

    # -- hooks of the step core -------------------------------------------------------------
    @torch.no_grad()
    def observe_ascent(self, grads: Sequence[torch.Tensor | None], num_groups: int) -> None:
        """Add ``g_j / c`` of this ascent group to the plain gradient at ``w`` (before perturb)."""
        if self._ascent_sum is None:
            self._ascent_sum = [None if g is None else torch.zeros_like(g) for g in grads]
        for acc, g in zip(self._ascent_sum, grads):
            if g is not None:
                acc.add_(g, alpha=1.0 / num_groups)

    def ascent_finished(self, engine: Any) -> None:
        """Sync the plain gradient at ``w`` (the step's one extra all-reduce) through ``engine``."""
        summed, self._ascent_sum = self._ascent_sum, None
        live = [g for g in summed or [] if g is not None]
        if live:  # a parameter without an ascent gradient: an empty placeholder on the same device
            empty = live[0].new_zeros(0)
            self._plain = engine.all_reduce_mean_([empty if g is None else g for g in summed])

    @contextlib.contextmanager
    def stepping_with(self, engine: Any, grad_norm: torch.Tensor | None = None) -> Iterator[None]:
        """Context for the base step an engine takes: its gradient layout (``engine.local_grads``),
        partial-sum reduction (``engine.sum_partials``) and, if it has it, ``||g||``."""
        self._view = (engine, grad_norm)
        try:
            yield
        finally:
            self._view = None

    # -- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """As SAM's; also keeps the gradient at ``w`` (``step(closure)`` on one process)."""
        self._plain = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in self.params]
        super().first_step(zero_grad=zero_grad)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w``; on a look step store ``g_v``, on an off step add the reuse term; base step."""
        self.restore()
        engine, norm = self._view if self._view is not None else (None, None)
        grads = engine.local_grads(self) if engine is not None else [p.grad for p in self.params]
        reduce = engine.sum_partials if engine is not None else _identity
        self.transform_(grads, grad_norm=norm, reduce=reduce)
        self.base_optimizer.step()
        self.num_steps += 1
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def transform_(self, grads: Sequence[torch.Tensor | None], *, grad_norm: torch.Tensor | None = None,
                   reduce: Reduce = _identity) -> None:
        """The LookSAM rule on the gradients the base is about to step with (engines with their own
        base step, DeepSpeed's, call this). ``grad_norm``: ``||g||`` if the caller has it."""
        if self.should_perturb():
            plain, self._plain = self._plain, None
            if plain is None:
                raise RuntimeError("a LookSAM look step needs the plain gradient at w: run it through "
                                   "dist_sam.sam_step or step(closure)")
            keep = [s is not None and t is not None and t.numel() == s.numel() for s, t in zip(grads, plain)]
            live = [(s, t) for s, t, ok in zip(grads, plain, keep) if ok]  # no placeholders of unused params
            g_v, self.g_v_norm = orthogonal_component([s for s, _ in live], [t for _, t in live], reduce)
            it = iter(g_v)
            self.g_v = [next(it) if ok else None for ok in keep]
            return
        if self.g_v is None or self.alpha == 0:
            return  # nothing stored yet (a resume from a plain state dict): a plain step
        live = [(t, v) for t, v in zip(grads, self.g_v) if t is not None and v is not None]
        if grad_norm is None:
            grad_norm = global_norm([t for t in grads if t is not None])
        reuse_([t for t, _ in live], [v for _, v in live], self.g_v_norm, grad_norm, self.alpha)

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """SAM's state dict plus ``{"looksam": {"g_v": [...], "g_v_norm": ...}}``."""
        state = super().state_dict()
        state["looksam"] = {"g_v": None if self.g_v is None else [None if v is None else v.clone() for v in self.g_v],
                            "g_v_norm": None if self.g_v_norm is None else self.g_v_norm.clone()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        look = state_dict.pop("looksam", {})
        super().load_state_dict(state_dict)
        g_v = look.get("g_v")
        self.g_v = None if g_v is None else [None if v is None else v.clone() for v in g_v]
        norm = look.get("g_v_norm")
        self.g_v_norm = None if norm is None else norm.clone()

    def __repr__(self) -> str:
        return f"LookSAM(base={self.base_optimizer!r}, k={self.k}, alpha={self.alpha}, warmup={self.warmup})"

