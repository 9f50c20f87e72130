"""Flow-matching loss: ``mean_b w_b * mean_{C,L} (v - u_t)^2`` with ``u_t = x1 - (1 - s) x0``.

Returns an fp32 scalar (float64 for float64 inputs). ``weight`` (B,) is an optional per-sample weight (1 when None). A fused
backend's backward writes dv = 2 w_b (v - u_t) / (B * numel_per_sample) without materialising u_t.
Contract: fp32 within 1e-5 relative of this reference.
"""
from __future__ import annotations

import torch

from . import _validate as V
from ._registry import register, select
from .fm_interpolate import validate_pair

OP = "fm_loss"


@register(OP, "torch")
def fm_loss_reference(v, x0, x1, t, weight, sigma_min):
    u_t = V.upcast(x1) - (1.0 - sigma_min) * V.upcast(x0)
    per_sample = (V.upcast(v) - u_t).square().flatten(1).mean(1)
    if weight is not None:
        per_sample = per_sample * V.upcast(weight)
    return per_sample.mean()


def fm_loss(v, x0, x1, t, weight=None, sigma_min: float = 0.0) -> torch.Tensor:
    """Scalar loss of predicted velocity ``v`` against the path's target (see module doc)."""
    validate_pair(x0, x1, t)
    V.tensor("v", v)
    V.shape("v", v, x1.shape, "same as x1")
    if weight is not None:
        V.tensor("weight", weight, 1)
        V.shape("weight", weight, (x1.shape[0],), "one per sample")
    V.same_device("x1", x1, v=v, weight=weight)
    s = V.sigma("sigma_min", sigma_min)
    return select(OP, v.device, v, x0, x1, t, weight).fn(v, x0, x1, t, weight, s)
