"""Diagnostics of the paper's §3.5 and Table 6: SGN covariance trace, Hessian trace, per-sample norms.

Every function takes a plain or DDP-wrapped model, an ``(x, y)`` pair or an iterable of batches,
and a per-sample ``loss_fn`` (``reduction="none"``); none touches BatchNorm running statistics.
Call ``model.eval()`` first for the usual per-sample definition under BatchNorm; in training mode
BatchNorm couples a batch's samples and ``∇f_i`` is the gradient of sample ``i``'s in-batch loss.
"""

from .per_sample import per_sample_grad_norms
from .traces import HessianTrace, hessian_trace, sgn_covariance_trace

__all__ = ["sgn_covariance_trace", "hessian_trace", "HessianTrace", "per_sample_grad_norms"]
