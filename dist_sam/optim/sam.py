"""The SAM optimizer wrapper (Foret et al. 2021); its USAM and ASAM variants are in ``variants.py``.

``SAM`` wraps any ``torch.optim.Optimizer`` and shares its ``param_groups`` and ``state``, so LR
schedulers, gradient scalers and checkpointing (DCP too) treat it like the base. The protocol::

    loss_fn(model(x), y).mean().backward()   # ascent gradient g at w
    opt.first_step(zero_grad=True)           # w <- w + e(g), w itself kept aside untouched
    loss_fn(model(x), y).mean().backward()   # descent gradient h at w + e
    opt.second_step(zero_grad=True)          # w swapped back; base.step() with h

or ``opt.step(closure)`` with a closure doing forward and backward. Data-parallel training, m-SAM
and mixed precision go through :func:`dist_sam.sam_step`, which drives the same object.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterable, Sequence

import torch

from .rules import perturbation, perturbation_scales

__all__ = ["SAM"]

_SAM_KEYS = ("rho", "adaptive", "eta", "normalize")


def _check_nonneg(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization around a base optimizer.

    Args:
        params: the parameters (or param-group dicts) to optimize. When ``base_optimizer`` is an
            instance, pass its parameters or ``None``.
        base_optimizer: an optimizer class (built on SAM's param groups with ``base_kwargs``) or an
            optimizer instance (whose param groups SAM adopts).
        rho: perturbation radius, ``>= 0``. ``rho = 0`` reproduces the base optimizer exactly.
        adaptive: ASAM's elementwise scaling ``T = |w| + eta``.
        eta: ASAM's offset, ``>= 0``.
        normalize: divide the ascent gradient by its global norm (``False`` gives USAM).
        interval: take a SAM step every ``interval`` steps and plain base steps in between.
        **base_kwargs: forwarded to ``base_optimizer`` when it is a class (``lr``, ``momentum``...).

    While perturbed, each parameter's data is a private ``w + e`` buffer and ``w`` waits untouched
    in the parameter's own storage, swapped back by :meth:`restore`. Neither appears in
    ``state_dict()``, which holds the base optimizer's state plus SAM's step counter.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict] | None,
        base_optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.0,
        normalize: bool = True,
        interval: int = 1,
        **base_kwargs: Any,
    ) -> None:
        _check_nonneg("rho", rho)
        _check_nonneg("eta", eta)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an integer >= 1, got {interval!r}")
        defaults = dict(rho=float(rho), adaptive=bool(adaptive), eta=float(eta), normalize=bool(normalize))

        if isinstance(base_optimizer, torch.optim.Optimizer):
            if base_kwargs:
                raise ValueError(f"base_kwargs {sorted(base_kwargs)} are only accepted with an optimizer class; "
                                 "base_optimizer is already an instance")
            own = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
            if params is not None:
                given = list(params)
                flat = [p for g in given for p in (g["params"] if isinstance(g, dict) else [g])]
                if {id(p) for p in flat} != own:
                    raise ValueError("params must be the base_optimizer instance's parameters (or None)")
            super().__init__(base_optimizer.param_groups, defaults)
            self.base_optimizer = base_optimizer
        elif inspect.isclass(base_optimizer) and issubclass(base_optimizer, torch.optim.Optimizer):
            if params is None:
                raise ValueError("params is None; it may be None only when base_optimizer is an instance")
            super().__init__(params, defaults)
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        else:
            raise ValueError(f"base_optimizer must be a torch.optim.Optimizer class or instance, got {base_optimizer!r}")
        self._share_groups()
        self.interval = interval
        self.num_steps = 0  # optimizer steps taken (SAM or plain); drives `interval`
        self._shadow: list[torch.Tensor] | None = None  # storage of w + e, one per parameter, reused
        self._home: list[tuple[torch.Tensor, torch.Tensor]] = []  # (param, its own data: w) while perturbed
        self._perturbed = False

    # -- bookkeeping -------------------------------------------------------------------------
    def _share_groups(self) -> None:
        """Make SAM and the base optimizer one set of param-group dicts (schedulers see both)."""
        self.param_groups = self.base_optimizer.param_groups
        for group in self.param_groups:
            for key in _SAM_KEYS:
                group.setdefault(key, self.defaults[key])
        self.defaults.update({k: v for k, v in self.base_optimizer.defaults.items() if k not in _SAM_KEYS})

    @property
    def state(self) -> Any:  # the base's: torch.distributed.checkpoint steps an optimizer whose state is empty
        return self.base_optimizer.state if "base_optimizer" in self.__dict__ else self.__dict__.get("_init_state", {})

    @state.setter
    def state(self, value: Any) -> None:  # Optimizer.__init__ sets one before base_optimizer exists
        if "base_optimizer" in self.__dict__:
            self.base_optimizer.state = value
        else:
            self.__dict__["_init_state"] = value

    @property
    def params(self) -> list[torch.Tensor]:
        """Every trainable parameter, in param-group order."""
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def should_perturb(self) -> bool:
        """Whether the coming step is a SAM step (``num_steps % interval == 0``)."""
        return self.num_steps % self.interval == 0

    @property
    def is_perturbed(self) -> bool:
        """True between :meth:`perturb` and :meth:`restore`."""
        return self._perturbed

    # -- the SAM primitives ------------------------------------------------------------------
    @torch.no_grad()
    def perturb(
        self, grads: Sequence[torch.Tensor | None], *, inplace: bool = False, grad_norm: torch.Tensor | None = None,
    ) -> None:
        """``w <- w + e(g)`` for the ascent gradients ``grads`` (aligned with :attr:`params`).

        ``w`` is never written: ``w + e`` goes into a second buffer per parameter (allocated once)
        swapped in as the parameter's data, and :meth:`restore` swaps ``w`` back (exact; no copy of
        ``w``): one fused ``w + s·g`` pass per micro-batch. A ``None`` gradient leaves its parameter
        where it is. ``grads`` may be the :meth:`ascent_buffers` (overwritten with ``w + e``);
        ``inplace=True`` lets the rule overwrite other ``grads`` (only buffers you own).
        ``grad_norm`` is ``||g||`` over every non-``None`` gradient, if the caller has it.
        """
        if self._perturbed:
            raise RuntimeError("perturb() called twice without restore()")
        params = self.params
        if len(grads) != len(params):
            raise ValueError(f"expected {len(params)} gradients, got {len(grads)}")
        self._perturbed = True
        live = [(i, p, g, group) for i, (p, g, group) in enumerate(zip(params, grads, self._group_of_params()))
                if g is not None]
        if not live or all(group["rho"] == 0 for *_, group in live):
            return  # rho = 0: the base optimizer's step, bit for bit
        idx, ps, gs, groups = (list(x) for x in zip(*live))
        shadows = self._shadows(params)
        shadow = [shadows[i] for i in idx]
        if not self.defaults["adaptive"] and all(g.dtype == p.dtype for g, p in zip(gs, ps)):
            scales = perturbation_scales(gs, rho=[g["rho"] for g in groups], normalize=self.defaults["normalize"],
                                         grad_norm=grad_norm)
            for w, g, s, out in zip(ps, gs, scales, shadow):  # w + s·g in one pass, w untouched
                torch.addcmul(w, g, s, out=out)
        else:
            for w, e, out in zip(ps, self.compute_perturbation(gs, ps, groups, inplace=inplace, grad_norm=grad_norm),
                                 shadow):
                torch.add(w, e, out=out)
        self._home = [(p, p.data) for p in ps]
        for p, out in zip(ps, shadow):
            p.data = out

    @torch.no_grad()
    def ascent_buffers(self, zero: bool = True) -> list[torch.Tensor]:
        """One buffer per parameter of :attr:`params` for the ascent gradient (zeroed, or for the caller
        to write with ``zero=False``); :meth:`perturb` writes ``w + e`` over them in place.

        Raises:
            RuntimeError: while perturbed (the buffers hold the weights in use).
        """
        if self._perturbed:
            raise RuntimeError("ascent_buffers() while perturbed: restore() first")
        buffers = self._shadows(self.params)
        if zero:
            torch._foreach_zero_(buffers)
        return buffers

    def _shadows(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The ``w + e`` buffers (also RW-SAM's workspace while unperturbed)."""
        if self._shadow is None or len(self._shadow) != len(params) or any(
                s.shape != p.shape or s.dtype != p.dtype or s.device != p.device for s, p in zip(self._shadow, params)):
            self._shadow = [torch.empty_like(p) for p in params]
        return self._shadow

    def compute_perturbation(
        self, grads: list[torch.Tensor], params: list[torch.Tensor], groups: list[dict], *,
        inplace: bool = False, grad_norm: torch.Tensor | None = None, norm_fn=None,
    ) -> list[torch.Tensor]:
        """The rule of this variant (SPEC.md §1), one global norm across all param groups.

        ``norm_fn`` replaces the global norm (a sharded engine's, across shards).

        ``rho`` and ``eta`` may differ per param group (a rho schedule works like an LR
        schedule); ``adaptive`` and ``normalize`` are optimizer-wide.
        """
        return perturbation(grads, params, rho=[g["rho"] for g in groups], eta=[g["eta"] for g in groups],
                            adaptive=self.defaults["adaptive"], normalize=self.defaults["normalize"], inplace=inplace,
                            grad_norm=grad_norm, **({} if norm_fn is None else {"norm_fn": norm_fn}))

    def _group_of_params(self) -> list[dict]:
        return [g for g in self.param_groups for p in g["params"] if p.requires_grad]

    @torch.no_grad()
    def restore(self) -> None:
        """Back to ``w``: undo :meth:`perturb` exactly (``w``'s own storage swapped back, never ``- e``)."""
        for p, home in self._home:
            p.data = home
        self._home = []
        self._perturbed = False

    # -- the widely copied two-step API ------------------------------------------------------
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Perturb with the gradients now in ``.grad`` (the ascent gradient)."""
        self.perturb([p.grad for p in self.params])
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` and step the base optimizer with the descent gradient in ``.grad``."""
        self.restore()
        self.base_optimizer.step()
        self.num_steps += 1
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step. With a ``closure`` (forward + backward, returning the loss): a whole SAM
        step, the closure run at ``w`` and at ``w + e`` (once on ``interval``'s plain steps), the loss
        at ``w`` returned. Without: :meth:`second_step` (what ``sam_step`` and ``GradScaler`` call).
        """
        if closure is None:
            self.second_step()
            return None
        closure = torch.enable_grad()(closure)
        if not self.should_perturb():
            self.zero_grad()
            loss = closure()
            self.second_step()
            return loss
        self.zero_grad()
        loss = closure()
        self.first_step(zero_grad=True)
        try:
            closure()
        finally:
            self.restore()
        self.second_step()
        return loss

    # -- hooks of the step core (dist_sam.core); RW-SAM and LookSAM override them --------------
    def ascent_context(self, module: torch.nn.Module, *, capture=None) -> contextlib.AbstractContextManager:
        """Context entered around the ascent forward (RW-SAM captures features in it): ``module`` is
        the user's eager module, ``capture`` the engine's way to record a layer (``StepEngine.capture``)."""
        return contextlib.nullcontext()

    def ascent_loss(self, losses: torch.Tensor, **context: Any) -> torch.Tensor:
        """The ascent objective from per-sample losses ``f_i(w)``: their mean for SAM."""
        return losses.mean()

    def observe_ascent(self, grads: Sequence[torch.Tensor | None], num_groups: int) -> None:
        """Sees each ascent group's gradient at ``w`` before :meth:`perturb` (LookSAM sums them)."""

    def ascent_finished(self, engine: Any) -> None:
        """Called once the step's groups are done, before the base step (LookSAM syncs its ``g``)."""

    def stepping_with(self, engine: Any, grad_norm: torch.Tensor | None = None) -> contextlib.AbstractContextManager:
        """Context around the engine's base step; ``grad_norm``: ``||g||`` if the engine took it."""
        return contextlib.nullcontext()

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus ``{"sam": {"num_steps": ...}}``; no weight copy."""
        state = self.base_optimizer.state_dict()
        state["sam"] = {"num_steps": self.num_steps}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` saved (a plain base-optimizer state dict works too)."""
        if self._perturbed:
            raise RuntimeError("cannot load a state dict while the weights are perturbed")
        state_dict = dict(state_dict)
        sam_state = state_dict.pop("sam", {})
        self.base_optimizer.load_state_dict(state_dict)
        self._share_groups()  # the base rebuilt its group dicts: share them again
        self.num_steps = int(sam_state.get("num_steps", 0))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base={self.base_optimizer!r}, interval={self.interval})"

