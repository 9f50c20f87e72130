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
from ._spec import KernelSpec, acc_dtype, needs_grad
from .fm_interpolate import validate_pair

OP = "fm_loss"


@register(OP, "torch")
def fm_loss_reference(v, x0, x1, t, weight, sigma_min):
    u_t = V.upcast(x1) - (1.0 - sigma_min) * V.upcast(x0)
    per_sample = (V.upcast(v) - u_t).square().flatten(1).mean(1)
    if weight is not None:
        per_sample = per_sample * V.upcast(weight)
    return per_sample.mean()


# ---------------------------------------------------------------- the kernel-level op, written once
# loss = mean_b w_b * mean (v - u)^2; with need_grad the same pass writes dv = dloss/dv, so the
# backward never forms u_t.
def _setup(ctx, inputs, output):
    v, x0, x1, weight, sigma_min, _need_grad = inputs
    _, per_sample, dv = output
    ctx.mark_non_differentiable(per_sample, dv)
    ctx.save_for_backward(dv, per_sample, weight)
    ctx.sigma_min = sigma_min
    ctx.dtypes = (v.dtype, x0.dtype, x1.dtype)


def _derivative(_backward_op):
    def backward(ctx, dloss, _dper_sample, _ddv):
        dv, per_sample, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        # dv was written by the forward pass for dloss = 1; u_t is never formed here either.
        g = dv * dloss if any(need[:3]) else None
        dv_out = g.to(ctx.dtypes[0]) if need[0] else None
        dx0 = (g * (1.0 - ctx.sigma_min)).to(ctx.dtypes[1]) if need[1] else None
        dx1 = (-g).to(ctx.dtypes[2]) if need[2] else None
        dw = (per_sample * dloss / per_sample.shape[0]).to(weight.dtype) if need[3] else None
        return dv_out, dx0, dx1, dw, None, None
    return backward


def _fake(v, x0, x1, weight, sigma_min, need_grad):
    acc = acc_dtype(v, x0, x1)
    dv = v.new_empty(v.shape if need_grad else (0,), dtype=acc)
    return v.new_empty((), dtype=acc), v.new_empty((v.shape[0],), dtype=acc), dv


FORWARD = KernelSpec("fm_loss", "(Tensor v, Tensor x0, Tensor x1, Tensor? weight, float sigma_min, bool need_grad) "
                     "-> (Tensor loss, Tensor per_sample, Tensor dv)", _fake, _setup, _derivative)

# cpp: benchmarks/results/cpu-2core.md (AVX-512) and cpu-avx2-2core.md (avx2 variant); cuda over
# triton on GPUs: host time per call (benchmarks/results/h200/host.log).
RANKS = {"cpp": {"cpu": 1}, "cuda": {"cuda": 2}, "triton": {"cuda": 1}}


# ---------------------------------------------------------------- compiled (cpp / cuda) backends
# Autograd: in C++ (csrc/fm_loss/autograd.cpp), the formula of _derivative.
if (_compiled := _ext.bind(FORWARD)) is not None:
    def _fm_loss_compiled(v, x0, x1, t, weight, sigma_min):
        return _compiled(v, x0, x1, weight, sigma_min, needs_grad(v, x0, x1, weight))[0]

    _ext.register_compiled(OP, FORWARD.name, _fm_loss_compiled, RANKS)


# ---------------------------------------------------------------- triton backend
# Non-contiguous samples are copied to unit-stride rows first (kernels/_blocks.py: rows_view).
if _triton.available():
    _tr_forward = _triton.bind(FORWARD, _triton.launcher("fm_loss", "forward"))
    _triton.register_triton(OP, lambda v, x0, x1, t, weight, sigma_min: _tr_forward(
        v, x0, x1, weight, sigma_min, needs_grad(v, x0, x1, weight))[0], RANKS["triton"])


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
    return select(OP, v).fn(v, x0, x1, t, weight, s)
