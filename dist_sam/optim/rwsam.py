"""RW-SAM (Reweighted SAM), the paper's method (SPEC.md §3).

The ascent loss weights each sample by an estimate ``s_i`` of its gradient norm::

    z = normalize(s)                        # zscore | mean | none
    p_i = exp(lam·z_i) / Σ_j exp(lam·z_j)   # Gibbs weights, eq. 20 (max-shifted)
    ascent loss = (1/b) Σ_i b·p_i · f_i(w)  # lam = 0: a_i = 1, exactly SAM

The perturbation rule (SAM, USAM, ASAM), the descent pass and the all-reduce are SAM's. The
weights are computed on each worker's own batch (each micro-batch under ``ascent="micro"``), from
a Rademacher direction seeded per (seed, step, rank, micro-batch), with no communication.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from typing import Any, Iterator

import torch
from torch import nn

from .calibration import calibrate_mu
from .estimators import (capture_layer, capture_rng, direction_seed, exact_norms, fd_norms, final_linear,
                         last_layer_norms)
from .registry import register_optimizer
from .rules import NORMALIZATIONS, gibbs_weights
from .sam import SAM

__all__ = ["RWSAM", "gibbs_weights", "ESTIMATORS", "NORMALIZATIONS"]

ESTIMATORS = ("fd", "exact", "last_layer")
logger = logging.getLogger("dist_sam")


def _validate(lam, estimator, mu, num_directions, normalization, last_layer, seed) -> None:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if mu != "auto" and (isinstance(mu, bool) or not isinstance(mu, (int, float)) or not (math.isfinite(mu) and mu > 0)):
        raise ValueError(f"mu must be a finite number > 0 or 'auto', got {mu!r}")
    if isinstance(num_directions, bool) or not isinstance(num_directions, int) or num_directions < 1:
        raise ValueError(f"num_directions (K) must be an integer >= 1, got {num_directions!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if last_layer is not None and not isinstance(last_layer, (str, nn.Module)):
        raise ValueError(f"last_layer must be None, a submodule name or an nn.Module, got {type(last_layer).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if last_layer is not None and estimator != "last_layer":
        warnings.warn(f"last_layer={last_layer!r} is ignored with estimator={estimator!r}", stacklevel=3)


class RWSAM(SAM):
    """Reweighted SAM: the ascent loss weights samples by their estimated gradient norms.

    Args:
        params: as for :class:`~dist_sam.optim.sam.SAM`.
        base_optimizer: as for :class:`~dist_sam.optim.sam.SAM`.
        rho: perturbation radius.
        lam: Gibbs temperature ``>= 0`` (0.5 in the paper; ``0`` is exactly SAM, estimator skipped).
        estimator: ``fd`` (finite difference, one extra forward per direction), ``exact``
            (``torch.func`` per-sample gradients) or ``last_layer`` (closed form for the final
            ``nn.Linear`` under cross-entropy, no extra forward).
        mu: the finite-difference step ``> 0``, or ``"auto"``: chosen on the first ``fd`` step's
            batch among ``1e-2 … 1e-6`` (:func:`~dist_sam.optim.calibration.calibrate_mu`), logged,
            and saved in :meth:`state_dict`. Each rank calibrates on its own first batch, without
            communication; a checkpoint (written by rank 0) carries rank 0's choice.
        num_directions: ``K >= 1`` Rademacher directions per estimate.
        normalization: ``zscore``, ``mean`` or ``none`` (see :func:`gibbs_weights`).
        last_layer: for ``last_layer``: the ``nn.Linear`` (or its name in the unwrapped model)
            producing the logits; default: the model's last ``nn.Linear``.
        seed: base seed of the directions, drawn from ``(seed, step, rank, micro-batch)``
            (:func:`~dist_sam.optim.estimators.direction_seed`); ``v`` covers the optimizer's
            parameters in the module's ``named_parameters()`` order.
        **kwargs: SAM's options (``adaptive``, ``eta``, ``normalize``, ``interval``) and the base
            optimizer's (``lr``, ``momentum``...). ``adaptive=True`` gives RW-ASAM,
            ``normalize=False`` RW-USAM.

    Use it through :func:`dist_sam.sam_step`, which enters :meth:`ascent_context` around the
    ascent forward and calls :meth:`ascent_loss` with the context the estimators need. By hand::

        with opt.ascent_context(model):
            out = model(x)
        losses = loss_fn(out, y)          # per sample
        opt.ascent_loss(losses, outputs=out, module=model, loss_fn=loss_fn, inputs=x, targets=y).backward()
        opt.first_step(zero_grad=True); loss_fn(model(x), y).mean().backward(); opt.second_step(zero_grad=True)

    After each ascent, :attr:`last_estimates` and :attr:`last_weights` hold ``s`` and ``a``.
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, *, lam: float = 0.5, estimator: str = "fd",
                 mu: float | str = "auto", num_directions: int = 1, normalization: str = "zscore",
                 last_layer: str | nn.Module | None = None, seed: int = 0, **kwargs: Any) -> None:
        _validate(lam, estimator, mu, num_directions, normalization, last_layer, seed)
        super().__init__(params, base_optimizer, rho=rho, **kwargs)
        self.lam, self.estimator, self.normalization = float(lam), estimator, normalization
        self.num_directions, self.last_layer, self.seed = num_directions, last_layer, seed
        self.auto_mu = mu == "auto"
        self.mu: float | None = None if self.auto_mu else float(mu)
        self.calibration = None  # the MuCalibration of mu="auto", once it ran
        self.last_estimates: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None
        self._take = None  # last_layer: the capture of the final Linear's forward (engine.capture)
        self._rng_state: tuple | None = None  # RNG before the ascent forward (dropout masks)
        self._layer_checked = False
        self._warned_eager = False
        #: Ascent groups per rank and step, set by a trainer that orders data by global sample index
        #: (``launch/train.py``); ``None``: directions are seeded per (rank, group).
        self.groups_per_rank: int | None = None
        #: ``{global group: mu}`` overriding :attr:`mu` for those groups (with :attr:`groups_per_rank`):
        #: a worker that took over groups whose ranks calibrated different ``mu`` keeps each one.
        self.group_mu: dict[int, float] = {}

    # -- hooks called by sam_step --------------------------------------------------------------
    @contextlib.contextmanager
    def ascent_context(self, module: nn.Module, *, capture=None) -> Iterator[None]:
        """Around the ascent forward: capture the final layer's input (``last_layer``) or the RNG
        state (``fd``, ``exact``: the estimator's forwards replay the ascent's dropout masks).

        Args:
            module: the user's module (``sam_step`` passes its engine's eager module).
            capture: how to record the final layer's forward; ``sam_step`` passes its engine's
                (one kept hook on a compiled model); by hand, a forward hook for the duration.
        """
        if self.lam == 0:
            yield
            return
        if self.estimator in ("fd", "exact"):
            self._rng_state = capture_rng(sorted({p.device for p in self.params if p.device.type == "cuda"}, key=str))
            yield
            return
        with (capture or capture_layer)(final_linear(module, self.last_layer)) as take:
            self._take = take
            yield


    def ascent_loss(self, losses: torch.Tensor, **context: Any) -> torch.Tensor:
        """``(1/b) Σ_i a_i f_i(w)`` with ``a = gibbs_weights(s, lam, normalization)``.

        Args:
            losses: per-sample losses ``f_i(w)`` of the ascent forward, shape ``(b,)``.
            **context: what :func:`dist_sam.sam_step` passes: ``module`` (or ``model``),
                ``loss_fn``, ``inputs``, ``targets``, ``outputs``, ``rank``, ``step``, ``group``,
                ``autocast``.
        """
        if self.lam == 0:
            return losses.mean()  # a_i = 1: SAM, bit for bit
        s = self._estimate(losses, context)
        a = gibbs_weights(s, self.lam, self.normalization)
        # A non-finite estimate (an overflowing extra forward) falls back to SAM's a_i = 1 for this
        # batch, without a host sync; non-finite losses still poison the step as under SAM.
        a = torch.where(torch.isfinite(a).all(), a, torch.ones_like(a))
        self.last_estimates, self.last_weights = s, a
        return (a.detach().to(losses.dtype) * losses).mean()

    # -- estimators ----------------------------------------------------------------------------
    def _estimate(self, losses: torch.Tensor, context: dict) -> torch.Tensor:
        if self.estimator == "last_layer":
            return self._last_layer_estimate(losses, context)
        rng_state, self._rng_state = self._rng_state, None  # this forward's, never a stale one
        module, loss_fn, x, y = self._require(context)
        eager = context.get("eager", module)  # torch.func.grad cannot run over a compiled module (dist_sam.compiled)
        if context.get("named_params") is not None:  # a sharded engine's unsharded copies of the parameters
            named = named_eager = context["named_params"]()
        else:
            ids = {id(p) for p in self.params}
            named = {n: p for n, p in module.named_parameters() if id(p) in ids}  # v covers them in this order
            named_eager = {n: p for n, p in eager.named_parameters() if id(p) in ids}  # the same, unprefixed
        if self.estimator == "exact":
            if eager is not module and not self._warned_eager:
                self._warned_eager = True
                warnings.warn("RW-SAM estimator='exact' runs on the eager module under torch.compile: torch.func.grad "
                              "over a compiled module is not supported from eager code", stacklevel=4)
            return exact_norms(eager, loss_fn, x, y, named_eager, rng_state=rng_state)
        seed = self._direction_seed(context)
        autocast = context.get("autocast") or contextlib.nullcontext
        if self.mu is None:
            self._calibrate(eager, loss_fn, x, y, losses, named_eager, seed, autocast, rng_state)
        mu = self.group_mu.get(self._global_group(context), self.mu) if self.group_mu else self.mu
        return fd_norms(module, loss_fn, x, y, losses, named, mu, seed=seed, num_directions=self.num_directions,
                        autocast=autocast, rng_state=rng_state, workspace=self._workspace(named))

    def _global_group(self, context: dict) -> int | None:
        """``rank * c + group`` when :attr:`groups_per_rank` is ``c``, else ``None``."""
        if self.groups_per_rank is None:
            return None
        return self._rank(context) * self.groups_per_rank + context.get("group", 0)

    def _direction_seed(self, context: dict) -> int:
        """Directions per ``(rank, group)``, or per global group ``rank * c + group`` when
        :attr:`groups_per_rank` is ``c`` (then the same samples get the same directions at any
        world size that keeps the group size; with ``c = 1`` both numberings agree)."""
        step = context.get("step", self.num_steps)
        if self.groups_per_rank is not None:
            return direction_seed(self.seed, step, self._global_group(context), 0)
        return direction_seed(self.seed, step, self._rank(context), context.get("group", 0))

    @staticmethod
    def _rank(context: dict) -> int:
        if context.get("rank") is None:  # the algorithm never asks torch.distributed: the caller knows the rank
            raise ValueError("RWSAM.ascent_loss needs rank=<this process's rank> in its context to seed its "
                             "directions (dist_sam.sam_step passes it; by hand, pass rank=0 in one process)")
        return context["rank"]

    def _workspace(self, named: dict) -> dict | None:
        """SAM's ``w + e`` buffers, idle until :meth:`perturb`, hold ``w + mu·v``: no extra memory."""
        params = self.params
        index = {id(p): i for i, p in enumerate(params)}
        if self.is_perturbed or not all(id(p) in index for p in named.values()):
            return None  # perturbed, or a sharded engine's copies: the estimator allocates its own
        shadows = self._shadows(params)
        return {n: shadows[index[id(p)]] for n, p in named.items()}

    def _calibrate(self, module, loss_fn, x, y, losses, named, seed, autocast, rng_state) -> None:
        result = calibrate_mu(module, loss_fn, x, y, losses, named, seed=seed, num_directions=self.num_directions,
                              autocast=autocast, rng_state=rng_state)
        self.mu, self.calibration = result.mu, result
        logger.info(
            "RW-SAM mu='auto': chose mu=%g, median relative error %.3g against the exact same-direction "
            "estimate (%.3g against the exact norms, K=%d), on a batch of %d; all: %s",
            result.mu, result.error, result.norm_error, self.num_directions, x.shape[0],
            {f"{m:g}": round(e, 6) for m, e in result.errors.items()},
        )

    @staticmethod
    def _require(context: dict) -> tuple:
        module = context.get("module", context.get("model"))
        found = dict(module=module, loss_fn=context.get("loss_fn"), inputs=context.get("inputs"),
                     targets=context.get("targets"))
        missing = [k for k, v in found.items() if v is None]
        if missing:
            raise ValueError(f"RWSAM.ascent_loss needs {missing} in its context (dist_sam.sam_step passes them)")
        return tuple(found.values())

    def _last_layer_estimate(self, losses: torch.Tensor, context: dict) -> torch.Tensor:
        captured, self._take = (self._take() if self._take is not None else None), None
        if captured is None:
            raise ValueError("estimator='last_layer' saw no forward of the final nn.Linear: run the ascent "
                             "forward inside opt.ascent_context(model) (dist_sam.sam_step does)")
        features, logits, layer = captured
        loss_fn, targets = context.get("loss_fn"), context.get("targets")
        if not isinstance(loss_fn, nn.CrossEntropyLoss) or loss_fn.weight is not None:
            raise ValueError(f"estimator='last_layer' has a closed form under unweighted cross-entropy only; "
                             f"loss_fn is {loss_fn!r}: use nn.CrossEntropyLoss(reduction='none') or estimator='fd'")
        if not self._layer_checked:  # once: the layer's output must be what the loss was computed from
            if logits.dim() != 2 or features.dim() != 2 or logits.shape[0] != losses.shape[0] or not torch.allclose(
                    loss_fn(logits, targets).float(), losses.detach().float(), rtol=1e-3, atol=1e-5):
                raise ValueError(f"estimator='last_layer': the final nn.Linear ({layer}) does not produce the "
                                 "(b, classes) logits the loss is computed from; name it with last_layer=... "
                                 "or use estimator='fd'")
            self._layer_checked = True
        return last_layer_norms(logits, features, targets, bias=layer.bias is not None,
                                label_smoothing=loss_fn.label_smoothing, ignore_index=loss_fn.ignore_index)

    # -- the closure API cannot reweight --------------------------------------------------------
    def step(self, closure=None):
        """As :meth:`SAM.step`; a ``closure`` computes its own mean loss, so it is not reweighted."""
        if closure is not None and self.lam != 0 and self.should_perturb():
            warnings.warn("RWSAM.step(closure) uses the closure's unweighted loss (plain SAM); use "
                          "dist_sam.sam_step or RWSAM.ascent_loss to reweight", stacklevel=2)
        return super().step(closure)

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """SAM's state dict plus ``{"rwsam": {"mu": ...}}`` (the calibrated ``mu``, or ``None``), and
        ``"group_mu"`` there when :attr:`group_mu` is set."""
        state = super().state_dict()
        state["rwsam"] = {"mu": self.mu}
        if self.group_mu:
            state["rwsam"]["group_mu"] = dict(self.group_mu)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load SAM's state; with ``mu="auto"`` also the saved ``mu``, so a resume never recalibrates."""
        state_dict = dict(state_dict)
        saved = state_dict.pop("rwsam", {})
        super().load_state_dict(state_dict)
        if self.auto_mu and saved.get("mu") is not None:
            self.mu = float(saved["mu"])
        if self.auto_mu:
            self.group_mu = {int(g): float(m) for g, m in saved.get("group_mu", {}).items()}

    def __repr__(self) -> str:
        mu = "auto" if self.auto_mu and self.mu is None else self.mu
        return (f"RWSAM(base={self.base_optimizer!r}, lam={self.lam}, estimator={self.estimator!r}, mu={mu}, "
                f"num_directions={self.num_directions}, normalization={self.normalization!r}, interval={self.interval})")


register_optimizer("rwsam", RWSAM)
