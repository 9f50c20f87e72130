"""The flow-matching path in one pass (Meta flow_matching's conventions: x0 noise, x1 data):

    x_t = (1 - (1 - s) t) x0 + t x1,    u_t = x1 - (1 - s) x0,    s = sigma_min,

with t (B,) broadcast over every other axis. Arithmetic in fp32, results in x1's dtype.
Contract: fp32 within 1e-5 relative of this reference; dt's per-sample sums use fixed chunks (no
atomics), so gradients are bit-identical run to run.
"""
from __future__ import annotations

import torch

from . import _ext, _triton
from . import _validate as V
from ._registry import register, select

OP = "fm_interpolate"


def _bcast(t, like):
    return V.upcast(t).reshape(t.shape[0], *([1] * (like.dim() - 1)))


@register(OP, "torch")
def fm_interpolate_reference(x0, x1, t, sigma_min):
    tb = _bcast(t, x1)
    x0f, x1f = V.upcast(x0), V.upcast(x1)
    x_t = (1.0 - (1.0 - sigma_min) * tb) * x0f + tb * x1f
    u_t = x1f - (1.0 - sigma_min) * x0f
    return x_t.to(x1.dtype), u_t.to(x1.dtype)


# ---------------------------------------------------------------- compiled (cpp / cuda) backends
if _ext.has_kernel("fm_interpolate", "cpp") or _ext.has_kernel("fm_interpolate", "cuda"):
    @torch.library.register_fake("flowfm::fm_interpolate")
    def _fi_fake(x0, x1, t, sigma_min):
        return _ext.empty(x1), _ext.empty(x1)

    @torch.library.register_fake("flowfm::fm_interpolate_backward")
    def _fi_backward_fake(dx_t, du_t, x0, x1, t, sigma_min):
        return _ext.empty(x0), _ext.empty(x1), _ext.empty(t)

    # Autograd: in C++ (csrc/fm_interpolate_autograd.cpp, the formula of _fi_triton_bwd below).
    _ext.register_compiled(OP, "fm_interpolate",
                           lambda x0, x1, t, sigma_min: _ext.op("fm_interpolate")(x0, x1, t, sigma_min))



# ---------------------------------------------------------------- triton backend
# Launches live in kernels/fm_interpolate.py, imported on first call so that importing the package
# never imports triton. Non-contiguous samples are copied to unit-stride rows first (see rows_view).
if _triton.available():
    @_triton.custom_op("fm_interpolate", mutates_args=(),
                             schema="(Tensor x0, Tensor x1, Tensor t, float sigma_min) -> (Tensor, Tensor)")
    def _fi_triton(x0, x1, t, sigma_min):
        from ..kernels import fm_interpolate as K
        return K.forward(x0, x1, t, sigma_min)

    @_fi_triton.register_fake
    def _fi_triton_fake(x0, x1, t, sigma_min):
        return (torch.empty(x1.shape, dtype=x1.dtype, device=x1.device),
                torch.empty(x1.shape, dtype=x1.dtype, device=x1.device))

    @_triton.custom_op(
        "fm_interpolate_backward",
        schema="(Tensor? dx_t, Tensor? du_t, Tensor x0, Tensor x1, Tensor t, float sigma_min, bool need_dt)"
               " -> (Tensor, Tensor, Tensor)")
    def _fi_triton_backward(dx_t, du_t, x0, x1, t, sigma_min, need_dt):
        from ..kernels import fm_interpolate as K
        return K.backward(dx_t, du_t, x0, x1, t, sigma_min, need_dt)

    @_fi_triton_backward.register_fake
    def _fi_triton_backward_fake(dx_t, du_t, x0, x1, t, sigma_min, need_dt):
        return (torch.empty(x1.shape, dtype=x0.dtype, device=x1.device),
                torch.empty(x1.shape, dtype=x1.dtype, device=x1.device),
                t.new_empty(t.shape if need_dt else (0,)))

    def _fi_triton_setup(ctx, inputs, output):
        x0, x1, t, sigma_min = inputs
        ctx.save_for_backward(x0, x1, t)
        ctx.sigma_min = sigma_min

    def _fi_triton_bwd(ctx, dx_t, du_t):
        x0, x1, t = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx0, dx1, dt = _fi_triton_backward(dx_t, du_t, x0, x1, t, ctx.sigma_min, bool(need[2]))
        return dx0 if need[0] else None, dx1 if need[1] else None, dt if need[2] else None, None

    _fi_triton.register_autograd(_fi_triton_bwd, setup_context=_fi_triton_setup)
    _triton.register_triton(OP, lambda x0, x1, t, sigma_min: _fi_triton(x0, x1, t, sigma_min))

def validate_pair(x0, x1, t):
    V.tensor("x1", x1)
    V.tensor("x0", x0)
    if x1.dim() < 2:
        raise ValueError(f"x1 must be batched, (B, ...), got shape {tuple(x1.shape)}")
    V.shape("x0", x0, x1.shape, "same as x1")
    V.same_device("x1", x1, x0=x0, t=t if hasattr(t, "device") else None)
    V.times("t", t, x1.shape[0])


def fm_interpolate(x0, x1, t, sigma_min: float = 0.0):
    """Returns ``(x_t, u_t)`` for noise x0, data x1 and times t in [0, 1]."""
    validate_pair(x0, x1, t)
    s = V.sigma("sigma_min", sigma_min)
    return select(OP, x1.device, x0, x1, t).fn(x0, x1, t, s)
