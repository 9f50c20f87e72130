"""Gated residual of adaLN-Zero blocks: ``res + gate * h``, gate (B, D) broadcast over T
(or (N, D) for rows), and the fused chain ``gated_residual_norm_modulate`` that returns both the
new residual and the next block's ``norm_modulate`` of it in one pass.

The result keeps ``res``'s dtype (the residual stream's precision is the caller's choice).
Contract: fp32 within 1e-5 relative of this reference; bf16/fp16 within Liger-style tolerances.
"""
from __future__ import annotations

import torch

from . import _ext, _triton
from . import _validate as V
from ._registry import register, select
from ._spec import KernelSpec, acc_dtype, empty, empty_or_absent, grad_or_none
from .norm_modulate import norm_modulate_reference, validate as validate_norm_modulate

OP = "gated_residual"
OP_FUSED = "gated_residual_norm_modulate"


@register(OP, "torch")
def gated_residual_reference(res, h, gate):
    g = V.upcast(gate)[:, None, :] if res.dim() == 3 else V.upcast(gate)
    return (V.upcast(res) + g * V.upcast(h)).to(res.dtype)


@register(OP_FUSED, "torch")
def gated_residual_norm_modulate_reference(res, h, gate, shift, scale, kind, weight, bias, eps, act):
    new_res = gated_residual_reference(res, h, gate)
    return new_res, norm_modulate_reference(new_res, shift, scale, kind, weight, bias, eps, act, None)


# ---------------------------------------------------------------- the kernel-level ops, written once
def _gr_fake(res, h, gate):
    return empty(res)


def _gr_backward_fake(dy, h, gate):
    return empty(h), empty(gate)


def _gr_setup(ctx, inputs, output):
    res, h, gate = inputs
    ctx.save_for_backward(h, gate)
    ctx.res_dtype = res.dtype


def _gr_derivative(backward_op):
    def backward(ctx, dy):
        h, gate = ctx.saved_tensors
        dh, dgate = backward_op(dy, h, gate)
        need = ctx.needs_input_grad
        return dy.to(ctx.res_dtype) if need[0] else None, dh if need[1] else None, dgate if need[2] else None
    return backward


def _grnm_fake(res, h, gate, shift, scale, weight, bias, kind, eps, act):
    rows, acc = (res.numel() // res.shape[-1],), acc_dtype(res)
    return empty(res), empty(res), res.new_empty(rows, dtype=acc), res.new_empty(rows, dtype=acc)


def _grnm_backward_fake(dnew_res, dy, new_res, h, gate, mean, rstd, shift, scale, weight, bias, kind, act):
    return (empty(new_res), empty(h), empty(gate),
            *(empty_or_absent(t, new_res) for t in (shift, scale, weight, bias)))


def _grnm_setup(ctx, inputs, output):
    res, h, gate, shift, scale, weight, bias, kind, _eps, act = inputs
    new_res, _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(new_res, h, gate, mean, rstd, shift, scale, weight, bias)
    ctx.args = (kind, act)


def _grnm_derivative(backward_op):
    def backward(ctx, dnew_res, dy, _dmean, _drstd):
        new_res, h, gate, mean, rstd, shift, scale, weight, bias = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(new_res)
        grads = backward_op(dnew_res, dy, new_res, h, gate, mean, rstd, shift, scale, weight, bias, *ctx.args)
        need = ctx.needs_input_grad
        return (grads[0] if need[0] else None, *(grad_or_none(g, n) for g, n in zip(grads[1:], need[1:7])),
                None, None, None)
    return backward


GR_BACKWARD = KernelSpec("gated_residual_backward",
                         "(Tensor dy, Tensor h, Tensor gate) -> (Tensor dh, Tensor dgate)", _gr_backward_fake)
GR_FORWARD = KernelSpec("gated_residual", "(Tensor res, Tensor h, Tensor gate) -> Tensor", _gr_fake,
                        _gr_setup, _gr_derivative, GR_BACKWARD)
GRNM_BACKWARD = KernelSpec(
    "gated_residual_norm_modulate_backward",
    "(Tensor? dnew_res, Tensor dy, Tensor new_res, Tensor h, Tensor gate, Tensor mean, Tensor rstd, "
    "Tensor? shift, Tensor? scale, Tensor? weight, Tensor? bias, str kind, str act) -> (Tensor dres, "
    "Tensor dh, Tensor dgate, Tensor dshift, Tensor dscale, Tensor dweight, Tensor dbias)", _grnm_backward_fake)
GRNM_FORWARD = KernelSpec(
    "gated_residual_norm_modulate",
    "(Tensor res, Tensor h, Tensor gate, Tensor? shift, Tensor? scale, Tensor? weight, Tensor? bias, "
    "str kind, float eps, str act) -> (Tensor new_res, Tensor y, Tensor mean, Tensor rstd)", _grnm_fake,
    _grnm_setup, _grnm_derivative, GRNM_BACKWARD)

# Where each fused backend runs, and its rank there (higher wins; the reference is 0).
# cpp: benchmarks/results/cpu-2core.md (AVX-512) and cpu-avx2-2core.md (avx2 variant); GPUs: the
# triton kernels (no CUDA C++ kernel of these). Inside torch.compile on the CPU both ops decompose
# to the reference, which Inductor fuses into the ops around them (compiled sampling of the small
# DiT at batch 1 ran faster so, neutral at batch 64 and in the training step:
# benchmarks/results/cpu-avx2-compile-ranks.md).
RANKS = {"cpp": {"cpu": 1, "compile:cpu": 0}, "triton": {"cuda": 1}}


# ---------------------------------------------------------------- compiled (cpp / cuda) backends
_ext.bind(GR_BACKWARD)
if (_gr_compiled := _ext.bind(GR_FORWARD)) is not None:
    _ext.register_compiled(OP, GR_FORWARD.name, lambda res, h, gate: _gr_compiled(res, h, gate), RANKS)

_ext.bind(GRNM_BACKWARD)
if (_grnm_op := _ext.bind(GRNM_FORWARD)) is not None:
    def _grnm_compiled(res, h, gate, shift, scale, kind, weight, bias, eps, act):
        new_res, y, _, _ = _grnm_op(res, h, gate, shift, scale, weight, bias, kind, eps, act or "none")
        return new_res, y

    _ext.register_compiled(OP_FUSED, GRNM_FORWARD.name, _grnm_compiled, RANKS)


# ---------------------------------------------------------------- triton backend
if _triton.available():
    _tr_gr_backward = _triton.bind(GR_BACKWARD, _triton.launcher("gated_residual", "gated_residual_backward"))
    _tr_gr = _triton.bind(GR_FORWARD, _triton.launcher("gated_residual", "gated_residual_forward"), _tr_gr_backward)
    _triton.register_triton(OP, lambda res, h, gate: _tr_gr(res, h, gate), RANKS["triton"])

    _tr_grnm_backward = _triton.bind(GRNM_BACKWARD, _triton.launcher("gated_residual", "fused_backward"))
    _tr_grnm = _triton.bind(GRNM_FORWARD, _triton.launcher("gated_residual", "fused_forward"), _tr_grnm_backward)

    def _grnm_triton(res, h, gate, shift, scale, kind, weight, bias, eps, act):
        new_res, y, _, _ = _tr_grnm(res, h, gate, shift, scale, weight, bias, kind, eps, act or "none")
        return new_res, y

    _triton.register_triton(OP_FUSED, _grnm_triton, RANKS["triton"])


def _validate(res, h, gate):
    V.tensor("res", res, (2, 3))
    V.tensor("h", h, (2, 3))
    V.tensor("gate", gate, 2)
    V.shape("h", h, res.shape, "same as res")
    V.shape("gate", gate, (res.shape[0], res.shape[-1]),
            "(B, D) broadcast over T" if res.dim() == 3 else "(N, D)")
    V.same_device("res", res, h=h, gate=gate)


def gated_residual(res, h, gate):
    """``res + gate * h`` with gate broadcast over the token axis."""
    _validate(res, h, gate)
    return select(OP, res).fn(res, h, gate)


def gated_residual_norm_modulate(res, h, gate, shift=None, scale=None, kind="layer", weight=None,
                                 bias=None, eps=1e-6, act=None):
    """``r = res + gate * h``; returns ``(r, act(norm(r) * (1 + scale) + shift))``.

    ``kind`` is ``"layer"`` or ``"rms"`` (token norms; GroupNorm has no residual chain here).
    """
    _validate(res, h, gate)
    V.choice("kind", kind, ("layer", "rms"))
    validate_norm_modulate(res, shift, scale, kind, weight, bias, eps, act, None, x_name="res")
    impl = select(OP_FUSED, res)
    new_res, y = impl.fn(res, h, gate, shift, scale, kind, weight, bias, float(eps), act)
    if V.norm_autocasts_to_fp32(res.device.type) and y.dtype in (torch.bfloat16, torch.float16):
        # The unfused chain under CUDA autocast: the residual keeps its dtype, the norm returns fp32.
        y = y.float()
    return new_res, y
