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
from ._spec import KernelSpec, empty

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


# ---------------------------------------------------------------- the kernel-level ops, written once
def _fake(x0, x1, t, sigma_min):
    return empty(x1), empty(x1)


FORWARD_SCHEMA = "(Tensor x0, Tensor x1, Tensor t, float sigma_min) -> (Tensor x_t, Tensor u_t)"
# The C++ backward always writes dt; the Triton one takes need_dt (its per-sample reduction is a
# second launch, skipped when t needs no gradient): two backward ops, one forward.
CPP_BACKWARD = KernelSpec(
    "fm_interpolate_backward",
    "(Tensor? dx_t, Tensor? du_t, Tensor x0, Tensor x1, Tensor t, float sigma_min) -> (Tensor dx0, Tensor dx1, "
    "Tensor dt)", lambda dx_t, du_t, x0, x1, t, sigma_min: (empty(x0), empty(x1), empty(t)))


def _triton_backward_fake(dx_t, du_t, x0, x1, t, sigma_min, need_dt):
    return empty(x0), empty(x1), t.new_empty(t.shape if need_dt else (0,))


TRITON_BACKWARD = KernelSpec(
    "fm_interpolate_backward",
    "(Tensor? dx_t, Tensor? du_t, Tensor x0, Tensor x1, Tensor t, float sigma_min, bool need_dt) -> "
    "(Tensor dx0, Tensor dx1, Tensor dt)", _triton_backward_fake)


def _setup(ctx, inputs, output):
    x0, x1, t, sigma_min = inputs
    ctx.save_for_backward(x0, x1, t)
    ctx.sigma_min = sigma_min


def _triton_derivative(backward_op):
    def backward(ctx, dx_t, du_t):
        x0, x1, t = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx0, dx1, dt = backward_op(dx_t, du_t, x0, x1, t, ctx.sigma_min, bool(need[2]))
        return dx0 if need[0] else None, dx1 if need[1] else None, dt if need[2] else None, None
    return backward


CPP_FORWARD = KernelSpec("fm_interpolate", FORWARD_SCHEMA, _fake, backward=CPP_BACKWARD)
TRITON_FORWARD = KernelSpec("fm_interpolate", FORWARD_SCHEMA, _fake, _setup, _triton_derivative, TRITON_BACKWARD)

# cpp: benchmarks/results/cpu-2core.md (AVX-512) and cpu-avx2-2core.md (avx2 variant); cuda over
# triton on GPUs: host time per call (benchmarks/results/h200/host.log).
RANKS = {"cpp": {"cpu": 1}, "cuda": {"cuda": 2}, "triton": {"cuda": 1}}


# ---------------------------------------------------------------- compiled (cpp / cuda) backends
# Autograd: in C++ (csrc/fm_interpolate/autograd.cpp).
_ext.bind(CPP_BACKWARD)
if (_compiled := _ext.bind(CPP_FORWARD)) is not None:
    _ext.register_compiled(OP, CPP_FORWARD.name, lambda x0, x1, t, sigma_min: _compiled(x0, x1, t, sigma_min), RANKS)


# ---------------------------------------------------------------- triton backend
# Non-contiguous samples are copied to unit-stride rows first (kernels/_blocks.py: rows_view).
if _triton.available():
    _tr_forward = _triton.bind(TRITON_FORWARD, _triton.launcher("fm_interpolate", "forward"),
                               _triton.bind(TRITON_BACKWARD, _triton.launcher("fm_interpolate", "backward")))
    _triton.register_triton(OP, lambda x0, x1, t, sigma_min: _tr_forward(x0, x1, t, sigma_min), RANKS["triton"])


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
    return select(OP, x1).fn(x0, x1, t, s)
