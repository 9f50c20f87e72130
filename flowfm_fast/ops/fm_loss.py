"""Flow-matching loss: ``mean_b w_b * mean_{C,L} (v - u_t)^2`` with ``u_t = x1 - (1 - s) x0``.

Returns an fp32 scalar (float64 for float64 inputs). ``weight`` (B,) is an optional per-sample weight (1 when None). A fused
backend's backward writes dv = 2 w_b (v - u_t) / (B * numel_per_sample) without materialising u_t.
Contract: fp32 within 1e-5 relative of this reference (close, not bit-exact: the fused backends sum in
fixed per-program chunks, without atomics, so each is bit-identical run to run).
"""
from __future__ import annotations

import torch

from . import _ext, _triton
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


# ---------------------------------------------------------------- fused backends' autograd
# Every fused fm_loss op (cpp, cuda, triton) has the schema
# (v, x0, x1, weight?, sigma_min, need_grad) -> (loss, per_sample, dv) and shares these.
def _fused_setup(ctx, inputs, output):
    v, x0, x1, weight, sigma_min, _need_grad = inputs
    _, per_sample, dv = output
    ctx.mark_non_differentiable(per_sample, dv)
    ctx.save_for_backward(dv, per_sample, weight)
    ctx.sigma_min = sigma_min
    ctx.dtypes = (v.dtype, x0.dtype, x1.dtype)


def _fused_backward(ctx, dloss, _dper_sample, _ddv):
    dv, per_sample, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    # dv was written by the forward pass for dloss = 1; u_t is never formed here either.
    g = dv * dloss if any(need[:3]) else None
    dv_out = g.to(ctx.dtypes[0]) if need[0] else None
    dx0 = (g * (1.0 - ctx.sigma_min)).to(ctx.dtypes[1]) if need[1] else None
    dx1 = (-g).to(ctx.dtypes[2]) if need[2] else None
    dw = (per_sample * dloss / per_sample.shape[0]).to(weight.dtype) if need[3] else None
    return dv_out, dx0, dx1, dw, None, None


def _fused_fake(v, x0, x1, weight, sigma_min, need_grad):
    acc = torch.float64 if torch.float64 in (v.dtype, x0.dtype, x1.dtype) else torch.float32
    dv = v.new_empty(v.shape if need_grad else (0,), dtype=acc)
    return v.new_empty((), dtype=acc), v.new_empty((v.shape[0],), dtype=acc), dv


def _need_grad(*tensors) -> bool:
    """Whether the forward pass should also write dv (some input will want a gradient)."""
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)


# ---------------------------------------------------------------- compiled (cpp / cuda) backends
if _ext.has_kernel("fm_loss", "cpp") or _ext.has_kernel("fm_loss", "cuda"):
    torch.library.register_fake("flowfm::fm_loss")(_fused_fake)
    # Its autograd is registered in C++ (csrc/fm_loss_autograd.cpp, the same formula as
    # _fused_backward): the Python path cost more host time than the kernel.

    def _fm_loss_compiled(v, x0, x1, t, weight, sigma_min):
        return _ext.op("fm_loss")(v, x0, x1, weight, sigma_min, _need_grad(v, x0, x1, weight))[0]

    _ext.register_compiled(OP, "fm_loss", _fm_loss_compiled)


# ---------------------------------------------------------------- triton backend
# Launches live in kernels/fm_loss.py, imported on first call so that importing the package never
# imports triton. Non-contiguous samples are copied to unit-stride rows first (see rows_view).
if _triton.available():
    @_triton.custom_op(
        "fm_loss",
        schema="(Tensor v, Tensor x0, Tensor x1, Tensor? weight, float sigma_min, bool need_grad)"
               " -> (Tensor, Tensor, Tensor)")
    def _fl_triton(v, x0, x1, weight, sigma_min, need_grad):
        from ..kernels import fm_loss as K
        return K.forward(v, x0, x1, weight, sigma_min, need_grad)

    _fl_triton.register_fake(_fused_fake)
    _fl_triton.register_autograd(_fused_backward, setup_context=_fused_setup)
    _triton.register_triton(OP, lambda v, x0, x1, t, weight, sigma_min: _fl_triton(
        v, x0, x1, weight, sigma_min, _need_grad(v, x0, x1, weight))[0])


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
