"""First-order m-SAM (``"msam-fo"``): the exact gradient of m-SAM's first-order objective.

Notation of SPEC.md §2: a worker's batch ``B`` of ``b`` samples is cut into ``c = b/m`` disjoint
groups ``B_1..B_c`` of ``m`` samples, in batch order; ``L_j(w) = f_{B_j}(w)`` is group ``j``'s mean
loss and ``g_j = ∇L_j(w)``. m-SAM's descent gradient is ``(1/c) Σ_j ∇L_j(w + e_j)`` with
``e_j = rho g_j / ||g_j||``; to first order in ``rho`` that is the gradient of::

    F(w) = (1/c) Σ_j [ L_j(w) + rho ||g_j(w)|| ]                 (the worker's batch loss + penalty)

    ∇F(w) = (1/c) Σ_j [ g_j + rho H_j g_j / (||g_j|| + eps_norm) ]      (H_j = ∇²L_j(w))

since ``∇L_j(w + e_j) = g_j + H_j e_j + O(rho²)``. This variant takes ``∇F`` exactly (double
backward: the Hessian-vector products ``H_j g_j`` are never formed as matrices) and hands it to the
base optimizer; ``w`` is never perturbed. Under DDP the worker's ``∇F`` is averaged by the one
gradient reduction of the step, as m-SAM's descent gradient is (the penalty is device-local).

Two exact implementations (``sam_step(..., ascent="micro", micro_batch_size=m, micro_impl=...)``):

* ``loop`` (:func:`dist_sam.core.penalty_passes`): per group, one forward at ``w``, ``g_j`` by
  ``autograd.grad(create_graph=True)``, one backward of ``(L_j + rho ||g_j||) / c``;
* ``vmap`` (:mod:`dist_sam.optim.first_order_vmap`): all ``c`` group gradients at once, then one
  backward of the summed norms.

``ascent="local"`` is ``m = b`` (``c = 1``: first-order SAM-local). BatchNorm: each group's forward
normalizes with its own batch statistics and updates the running statistics once, as m-SAM's
ascent forwards do; the penalty differentiates through the batch statistics.
"""

from __future__ import annotations

from typing import Any

from .sam import SAM

__all__ = ["FirstOrderMSAM"]

_REFUSED = ("adaptive", "eta", "normalize")


class FirstOrderMSAM(SAM):
    """m-SAM to first order: the base optimizer steps with ``∇[(1/c) Σ_j L_j + (rho/c) Σ_j ||g_j||]``.

    Args:
        params: as :class:`~dist_sam.SAM`.
        base_optimizer: an optimizer class or instance, as :class:`~dist_sam.SAM`.
        rho: the penalty's weight (m-SAM's radius), a number ``> 0``; one value for every param group.
        interval: a penalized step every ``interval`` steps, plain base steps in between.
        **kwargs: the base optimizer's options (``lr``, ``momentum``...).

    Run it through :func:`dist_sam.sam_step` with ``ascent="micro", micro_batch_size=m`` (or
    ``ascent="local"``: ``m = b``); the two-step API (``first_step``, ``step(closure)``) does not apply.
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, interval: int = 1, **kwargs: Any) -> None:
        refused = sorted(k for k in kwargs if k in _REFUSED)
        if refused:
            raise ValueError(f"FirstOrderMSAM penalizes SAM's norm ||g_j||; {refused} do not apply (got "
                             f"{ {k: kwargs[k] for k in refused} })")
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho > 0:
            raise ValueError(f"rho must be a number > 0 for FirstOrderMSAM (rho = 0 is the base optimizer: use "
                             f"dist_sam.base_step), got {rho!r}")
        super().__init__(params, base_optimizer, rho=rho, interval=interval, **kwargs)

    def penalty_rho(self) -> float:
        """The penalty weight ``rho``, the same in every param group (a rho schedule sets them all).

        Raises:
            ValueError: the param groups disagree, or ``rho <= 0``.
        """
        values = sorted({float(g["rho"]) for g in self.param_groups})
        if len(values) != 1 or not values[0] > 0:
            raise ValueError(f"FirstOrderMSAM needs one rho > 0 shared by every param group, got {values}")
        return values[0]

    def perturb(self, grads, **kwargs: Any) -> None:
        raise RuntimeError("FirstOrderMSAM never perturbs w: run it through dist_sam.sam_step (plain or DDP models)")

    def first_step(self, zero_grad: bool = False) -> None:
        raise RuntimeError("FirstOrderMSAM never perturbs w: run it through dist_sam.sam_step (plain or DDP models)")

    def step(self, closure=None):
        """Finish a step whose penalized gradient is in ``.grad`` (what :func:`dist_sam.sam_step` does)."""
        if closure is not None:
            raise ValueError("FirstOrderMSAM.step takes no closure: run the step through dist_sam.sam_step")
        return super().step()

    def __repr__(self) -> str:
        return f"FirstOrderMSAM(base={self.base_optimizer!r}, rho={self.defaults['rho']}, interval={self.interval})"
