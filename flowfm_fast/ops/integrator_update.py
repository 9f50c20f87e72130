"""Integrator updates: the in-place Euler step ``x += dt * v`` and the multi-stage combine
``out = x + dt * sum_i b_i k_i`` (Runge-Kutta stage inputs and the final update alike).

Both are exact elementwise formulas; ``out`` may be ``x`` itself (in-place update).
Contract: fp32 within 1e-6 relative of this reference (summation order is fixed: k_0 first).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from . import _ext, _triton
from . import _validate as V
from ._registry import register, select

OP_EULER = "euler_step_"
OP_COMBINE = "rk_combine"


@register(OP_EULER, "torch")
def euler_step_reference_(x, v, dt):
    return x.add_(v, alpha=dt)


@register(OP_COMBINE, "torch")
def rk_combine_reference(x, dt, ks, bs, out):
    terms = [(k, b) for k, b in zip(ks, bs) if b != 0.0]
    if out is None and torch.is_grad_enabled() and any(t.requires_grad for t in (x, *ks)):
        # out= writes are not differentiable: the same sum, out of place, for autograd.
        y = x
        for k, b in terms:
            y = torch.add(y, k, alpha=dt * b)
        return y.to(x.dtype) if terms else x.clone()
    if out is None:
        out = torch.empty_like(x)
    if not terms:
        return out.copy_(x)
    # out doubling as a stage read after the first write would be read already overwritten.
    # Skipped while torch.compile traces (it cannot read storage pointers): compiled callers must not
    # pass an out that is also a later stage.
    if not torch.compiler.is_compiling() and any(
            k.untyped_storage().data_ptr() == out.untyped_storage().data_ptr() for k, _ in terms[1:]):
        return out.copy_(rk_combine_reference(x, dt, ks, bs, None))
    k0, b0 = terms[0]
    torch.add(x, k0, alpha=dt * b0, out=out)
    for k, b in terms[1:]:
        out.add_(k, alpha=dt * b)
    return out


# ---------------------------------------------------------------- compiled (cpp / cuda) backends
# The in-place updates are for solvers (no autograd): they take the compiled path only when no
# input needs a gradient, and otherwise the reference, whose add_ autograd understands.
def _no_grad_inputs(device_type):
    def can_use(*tensors):
        return all(t.device.type == device_type and t.dtype in _ext.SUPPORTED_DTYPES
                   and not (t.requires_grad and torch.is_grad_enabled()) for t in tensors)
    return can_use


if _ext.has_kernel("euler_step_", "cpp") or _ext.has_kernel("euler_step_", "cuda"):
    @torch.library.register_fake("flowfm::euler_step_")
    def _euler_fake(x, v, dt):
        return None

    def _euler_compiled(x, v, dt):
        _ext.op("euler_step_")(x, v, dt)
        return x

    for _b, _dev in (("cpp", "cpu"), ("cuda", "cuda")):
        if _ext.has_kernel("euler_step_", _b):
            register(OP_EULER, _b, _no_grad_inputs(_dev))(_euler_compiled)

if _ext.has_kernel("rk_combine", "cpp") or _ext.has_kernel("rk_combine", "cuda"):
    @torch.library.register_fake("flowfm::rk_combine")
    def _combine_fake(out, x, ks, bs, dt):
        return None

    def _combine_compiled(x, dt, ks, bs, out):
        if out is None:
            out = torch.empty_like(x)
        _ext.op("rk_combine")(out, x, ks, bs, dt)
        return out

    for _b, _dev in (("cpp", "cpu"), ("cuda", "cuda")):
        if _ext.has_kernel("rk_combine", _b):
            register(OP_COMBINE, _b, _no_grad_inputs(_dev))(_combine_compiled)


# ---------------------------------------------------------------- triton backend
# Launches live in kernels/integrator_update.py, imported on first call so that importing the
# package never imports triton. Like the compiled ones, only for inputs that need no gradient.
if _triton.available():
    @_triton.custom_op("euler_step_", mutates_args=("x",),
                             schema="(Tensor(a!) x, Tensor v, float dt) -> ()")
    def _euler_triton_op(x, v, dt):
        from ..kernels import integrator_update as K
        K.euler_step_(x, v, dt)

    @_euler_triton_op.register_fake
    def _euler_triton_fake(x, v, dt):
        return None

    @_triton.custom_op("rk_combine", mutates_args=("out",),
                             schema="(Tensor(a!) out, Tensor x, Tensor[] ks, float[] bs, float dt) -> ()")
    def _combine_triton_op(out, x, ks, bs, dt):
        from ..kernels import integrator_update as K
        K.rk_combine(out, x, ks, bs, dt)

    @_combine_triton_op.register_fake
    def _combine_triton_fake(out, x, ks, bs, dt):
        return None

    def _euler_triton(x, v, dt):
        _euler_triton_op(x, v, dt)
        return x

    def _combine_triton(x, dt, ks, bs, out):
        if out is None:
            out = torch.empty_like(x)
        _combine_triton_op(out, x, ks, bs, dt)
        return out

    def _triton_no_grad(*tensors):
        return _triton.can_use(*tensors) and not any(t.requires_grad and torch.is_grad_enabled() for t in tensors)

    _triton.register_triton(OP_EULER, _euler_triton, _triton_no_grad)
    _triton.register_triton(OP_COMBINE, _combine_triton, _triton_no_grad)


def _dt(dt) -> float:
    if isinstance(dt, bool) or not isinstance(dt, (int, float)):
        raise TypeError(f"dt must be a float, got {type(dt).__name__}")
    if not math.isfinite(dt):
        raise ValueError(f"dt must be finite, got {dt}")
    return float(dt)


def euler_step_(x: torch.Tensor, v: torch.Tensor, dt: float) -> torch.Tensor:
    """``x += dt * v`` in place; returns x."""
    V.tensor("x", x)
    V.tensor("v", v)
    V.shape("v", v, x.shape, "same as x")
    V.same_device("x", x, v=v)
    V.written_in_place("x", x)
    V.no_partial_overlap("x", x, v=v)
    return select(OP_EULER, x.device, x, v).fn(x, v, _dt(dt))


def rk_combine(x: torch.Tensor, dt: float, ks: Sequence[torch.Tensor], bs: Sequence[float],
               out: torch.Tensor | None = None) -> torch.Tensor:
    """``x + dt * sum_i bs[i] * ks[i]`` written to ``out`` (new tensor when None; may be x).

    Differentiable with ``out=None``; ``out=`` writes record no gradients, so they are refused
    while x or ks require grad (under grad mode)."""
    V.tensor("x", x)
    if len(ks) == 0 or len(ks) != len(bs):
        raise ValueError(f"ks and bs must be non-empty and of equal length, got {len(ks)} and {len(bs)}")
    for i, k in enumerate(ks):
        V.tensor(f"ks[{i}]", k)
        V.shape(f"ks[{i}]", k, x.shape, "same as x")
        V.same_device("x", x, **{f"ks[{i}]": k})
    if not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bs):
        raise TypeError(f"bs must be floats, got {[type(b).__name__ for b in bs]}")
    bs = [float(b) for b in bs]
    if not all(math.isfinite(b) for b in bs):
        raise ValueError(f"bs must be finite, got {bs}")
    if out is not None:
        V.tensor("out", out)
        V.shape("out", out, x.shape, "same as x")
        V.same_device("x", x, out=out)
        V.written_in_place("out", out)
        V.no_partial_overlap("out", out, x=x, **{f"ks[{i}]": k for i, k in enumerate(ks)})
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *ks)):
            raise ValueError("rk_combine(out=...) cannot record gradients (x or ks require grad): "
                             "pass out=None, or call under torch.no_grad()")
    return select(OP_COMBINE, x.device, x, *ks).fn(x, _dt(dt), list(ks), bs, out)
