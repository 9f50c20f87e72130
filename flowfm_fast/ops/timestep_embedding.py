"""Sinusoidal timestep features: ``[cos(t * f_k), sin(t * f_k)]`` with
``f_k = max_period ** (-k / half)``, ``k = 0 .. half - 1`` (DiT's convention; an odd ``dim``
gets one zero column). Output is float32 whatever ``t``'s dtype.

Contract: the reference is the oracle; fused backends match it within 1e-5 relative in fp32.
"""
from __future__ import annotations

import math

import torch

from . import _ext, _triton
from . import _validate as V
from ._registry import register, select

OP = "timestep_embedding"


@register(OP, "torch")
def timestep_embedding_reference(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * k / half)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


# ---------------------------------------------------------------- fused backends (shared glue)
# The cpp/cuda ops (flowfm::) and the Triton ops (flowfm_triton::) have the same schema, fake
# outputs and autograd formula; only the backward op differs.
def _emb_fake(t, dim, max_period):
    return t.new_empty((t.shape[0], dim), dtype=torch.float32)


def _dt_fake(demb, t, dim, max_period):
    return t.new_empty(t.shape, dtype=t.dtype if t.is_floating_point() else torch.float32)


def _setup(ctx, inputs, output):
    t, dim, max_period = inputs
    ctx.save_for_backward(t)
    ctx.args = (dim, max_period)


def _backward_via(backward_op):
    def backward(ctx, demb):
        (t,) = ctx.saved_tensors
        return (backward_op(demb, t, *ctx.args) if ctx.needs_input_grad[0] else None), None, None
    return backward


def _real_dtype(t):
    # Integer step indices are fine; the kernels take any real dtype.
    return t.dtype not in (torch.bool, torch.complex64, torch.complex128)


# ---------------------------------------------------------------- compiled (cpp / cuda) backends
if _ext.has_kernel("timestep_embedding", "cpp") or _ext.has_kernel("timestep_embedding", "cuda"):
    torch.library.register_fake("flowfm::timestep_embedding")(_emb_fake)
    torch.library.register_fake("flowfm::timestep_embedding_backward")(_dt_fake)
    # Autograd: in C++ (csrc/timestep_embedding_autograd.cpp, the formula of _backward_via below).

    for _backend_name, _dev in (("cpp", "cpu"), ("cuda", "cuda")):
        if _ext.has_kernel("timestep_embedding", _backend_name):
            register(OP, _backend_name,
                     lambda t, _d=_dev: t.device.type == _d and _real_dtype(t) and not _ext.in_functorch_transform())(
                lambda t, dim, max_period: _ext.op("timestep_embedding")(t, dim, max_period))


# ---------------------------------------------------------------- triton backend
# Launches live in kernels/timestep_embedding.py, imported on first call so that importing the
# package never imports triton.
if _triton.available():
    @_triton.custom_op("timestep_embedding", mutates_args=(),
                             schema="(Tensor t, int dim, float max_period) -> Tensor")
    def _te_triton(t, dim, max_period):
        from ..kernels import timestep_embedding as K
        return K.forward(t, dim, max_period)

    @_triton.custom_op("timestep_embedding_backward", mutates_args=(),
                             schema="(Tensor demb, Tensor t, int dim, float max_period) -> Tensor")
    def _te_triton_backward(demb, t, dim, max_period):
        from ..kernels import timestep_embedding as K
        return K.backward(demb, t, dim, max_period)

    _te_triton.register_fake(_emb_fake)
    _te_triton_backward.register_fake(_dt_fake)
    _te_triton.register_autograd(_backward_via(_te_triton_backward), setup_context=_setup)
    _triton.register_triton(OP, lambda t, dim, max_period: _te_triton(t, dim, max_period),
                            lambda t: _triton._device_ok(t) and _real_dtype(t))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) times -> (N, dim) float32 features. ``t`` may be float or integer (DDPM steps)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype in (torch.bool, torch.complex64, torch.complex128):
        raise TypeError(f"t must be a real float or integer tensor, got {t.dtype}")
    V.tensor("t", t, 1, floating=False)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    V.positive_float("max_period", max_period)
    return select(OP, t.device, t).fn(t, dim, float(max_period))
