"""Gated residual of adaLN-Zero blocks: ``res + gate * h``, gate (B, D) broadcast over T
(or (N, D) for rows), and the fused chain ``gated_residual_norm_modulate`` that returns both the
new residual and the next block's ``norm_modulate`` of it in one pass.

The result keeps ``res``'s dtype (the residual stream's precision is the caller's choice).
Contract: fp32 within 1e-5 relative of this reference; bf16/fp16 within Liger-style tolerances.
"""
from __future__ import annotations

import torch

from . import _ext
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
        return torch.empty_like(res)

    @torch.library.register_fake("flowfm::gated_residual_backward")
    def _gated_residual_backward_fake(dy, h, gate):
        return torch.empty_like(h), torch.empty_like(gate)

    def _gr_setup(ctx, inputs, output):
        res, h, gate = inputs
        ctx.save_for_backward(h, gate)
        ctx.res_dtype = res.dtype

    def _gr_backward(ctx, dy):
        h, gate = ctx.saved_tensors
        dh, dgate = _ext.op("gated_residual_backward")(dy, h, gate)
        return dy.to(ctx.res_dtype), dh, dgate

    torch.library.register_autograd("flowfm::gated_residual", _gr_backward, setup_context=_gr_setup)
    _ext.register_compiled(OP, "gated_residual", lambda res, h, gate: _ext.op("gated_residual")(res, h, gate))


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
    return impl.fn(res, h, gate, shift, scale, kind, weight, bias, float(eps), act)
