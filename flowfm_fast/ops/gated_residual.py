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


# ---------------------------------------------------------------- compiled (cpp / cuda) backends
if _ext.has_kernel("gated_residual", "cpp") or _ext.has_kernel("gated_residual", "cuda"):
    @torch.library.register_fake("flowfm::gated_residual")
    def _gated_residual_fake(res, h, gate):
        return _ext.empty(res)

    @torch.library.register_fake("flowfm::gated_residual_backward")
    def _gated_residual_backward_fake(dy, h, gate):
        return _ext.empty(h), _ext.empty(gate)

    # Autograd of both compiled ops: in C++ (csrc/gated_residual_autograd.cpp, the formulas of the
    # Triton ops' _tr_gr_bwd / _tr_grnm_bwd below), as the Python register_autograd path cost as much
    # host time as a small block's kernels.
    _ext.register_compiled(OP, "gated_residual", lambda res, h, gate: _ext.op("gated_residual")(res, h, gate))


if _ext.has_kernel("gated_residual_norm_modulate", "cpp") or _ext.has_kernel("gated_residual_norm_modulate", "cuda"):
    @torch.library.register_fake("flowfm::gated_residual_norm_modulate")
    def _grnm_fake(res, h, gate, shift, scale, weight, bias, kind, eps, act):
        acc = torch.float64 if res.dtype == torch.float64 else torch.float32
        rows = (res.numel() // res.shape[-1],)
        return (_ext.empty(res), _ext.empty(res), res.new_empty(rows, dtype=acc),
                res.new_empty(rows, dtype=acc))

    @torch.library.register_fake("flowfm::gated_residual_norm_modulate_backward")
    def _grnm_backward_fake(dnew_res, dy, new_res, h, gate, mean, rstd, shift, scale, weight, bias, kind, act):
        like = lambda t: new_res.new_empty((0,)) if t is None else _ext.empty(t)  # noqa: E731
        return (_ext.empty(new_res), _ext.empty(h), _ext.empty(gate), like(shift), like(scale),
                like(weight), like(bias))

    def _grnm_compiled(res, h, gate, shift, scale, kind, weight, bias, eps, act):
        new_res, y, _, _ = _ext.op("gated_residual_norm_modulate")(res, h, gate, shift, scale, weight, bias, kind,
                                                                    eps, act or "none")
        return new_res, y

    _ext.register_compiled(OP_FUSED, "gated_residual_norm_modulate", _grnm_compiled)


# ---------------------------------------------------------------- triton backend
if _triton.available():
    from typing import Optional

    from torch import Tensor

    @_triton.custom_op("gated_residual")
    def _tr_gr(res: Tensor, h: Tensor, gate: Tensor) -> Tensor:
        from ..kernels import gated_residual as K
        return K.gated_residual_forward(res, h, gate)

    @_triton.custom_op("gated_residual_backward")
    def _tr_gr_backward(dy: Tensor, h: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
        from ..kernels import gated_residual as K
        return K.gated_residual_backward(dy, h, gate)

    # The kernels write every output contiguous, whatever the inputs' strides.
    def _contig(t):
        return _ext.empty(t)

    @_tr_gr.register_fake
    def _tr_gr_fake(res, h, gate):
        return _contig(res)

    @_tr_gr_backward.register_fake
    def _tr_gr_backward_fake(dy, h, gate):
        return _contig(h), _contig(gate)

    def _tr_gr_setup(ctx, inputs, output):
        res, h, gate = inputs
        ctx.save_for_backward(h, gate)
        ctx.res_dtype = res.dtype

    def _tr_gr_bwd(ctx, dy):
        h, gate = ctx.saved_tensors
        dh, dgate = _tr_gr_backward(dy, h, gate)
        need = ctx.needs_input_grad
        return dy.to(ctx.res_dtype) if need[0] else None, dh if need[1] else None, dgate if need[2] else None

    _tr_gr.register_autograd(_tr_gr_bwd, setup_context=_tr_gr_setup)
    _triton.register_triton(OP, lambda res, h, gate: _tr_gr(res, h, gate))

    @_triton.custom_op("gated_residual_norm_modulate")
    def _tr_grnm(res: Tensor, h: Tensor, gate: Tensor, shift: Optional[Tensor], scale: Optional[Tensor],
                 weight: Optional[Tensor], bias: Optional[Tensor], kind: str, eps: float, act: str
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from ..kernels import gated_residual as K
        return K.fused_forward(res, h, gate, shift, scale, weight, bias, kind, eps, act)

    @_triton.custom_op("gated_residual_norm_modulate_backward")
    def _tr_grnm_backward(dnew_res: Optional[Tensor], dy: Tensor, new_res: Tensor, h: Tensor, gate: Tensor,
                          mean: Tensor, rstd: Tensor, shift: Optional[Tensor], scale: Optional[Tensor],
                          weight: Optional[Tensor], bias: Optional[Tensor], kind: str, act: str
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        from ..kernels import gated_residual as K
        return K.fused_backward(dnew_res, dy, new_res, h, gate, mean, rstd, shift, scale, weight, bias, kind, act)

    @_tr_grnm.register_fake
    def _tr_grnm_fake(res, h, gate, shift, scale, weight, bias, kind, eps, act):
        acc = torch.float64 if res.dtype == torch.float64 else torch.float32
        rows = (res.numel() // res.shape[-1],)
        return _contig(res), _contig(res), res.new_empty(rows, dtype=acc), res.new_empty(rows, dtype=acc)

    @_tr_grnm_backward.register_fake
    def _tr_grnm_backward_fake(dnew_res, dy, new_res, h, gate, mean, rstd, shift, scale, weight, bias, kind, act):
        like = lambda t: new_res.new_empty((0,)) if t is None else _contig(t)  # noqa: E731
        return _contig(new_res), _contig(h), _contig(gate), like(shift), like(scale), like(weight), like(bias)

    def _tr_grnm_setup(ctx, inputs, output):
        res, h, gate, shift, scale, weight, bias, kind, _eps, act = inputs
        new_res, _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(new_res, h, gate, mean, rstd, shift, scale, weight, bias)
        ctx.args = (kind, act)

    def _tr_grnm_bwd(ctx, dnew_res, dy, _dmean, _drstd):
        new_res, h, gate, mean, rstd, shift, scale, weight, bias = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(new_res)
        grads = _tr_grnm_backward(dnew_res, dy, new_res, h, gate, mean, rstd, shift, scale, weight, bias, *ctx.args)
        need = ctx.needs_input_grad
        return (grads[0] if need[0] else None, *(_ext.grad_or_none(g, n) for g, n in zip(grads[1:], need[1:7])),
                None, None, None)

    _tr_grnm.register_autograd(_tr_grnm_bwd, setup_context=_tr_grnm_setup)

    def _grnm_triton(res, h, gate, shift, scale, kind, weight, bias, eps, act):
        new_res, y, _, _ = _tr_grnm(res, h, gate, shift, scale, weight, bias, kind, eps, act or "none")
        return new_res, y

    _triton.register_triton(OP_FUSED, _grnm_triton)


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
    return select(OP, res.device, res, h, gate).fn(res, h, gate)


def gated_residual_norm_modulate(res, h, gate, shift=None, scale=None, kind="layer", weight=None,
                                 bias=None, eps=1e-6, act=None):
    """``r = res + gate * h``; returns ``(r, act(norm(r) * (1 + scale) + shift))``.

    ``kind`` is ``"layer"`` or ``"rms"`` (token norms; GroupNorm has no residual chain here).
    """
    _validate(res, h, gate)
    V.choice("kind", kind, ("layer", "rms"))
    validate_norm_modulate(res, shift, scale, kind, weight, bias, eps, act, None, x_name="res")
    impl = select(OP_FUSED, res.device, res, h, gate, shift, scale, weight, bias)
    new_res, y = impl.fn(res, h, gate, shift, scale, kind, weight, bias, float(eps), act)
    if V.norm_autocasts_to_fp32(res.device.type) and y.dtype in (torch.bfloat16, torch.float16):
        # The unfused chain under CUDA autocast: the residual keeps its dtype, the norm returns fp32.
        y = y.float()
    return new_res, y
