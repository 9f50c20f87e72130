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
from ._spec import KernelSpec

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


# ---------------------------------------------------------------- the kernel-level ops, written once
def _emb_fake(t, dim, max_period):
    return t.new_empty((t.shape[0], dim), dtype=torch.float32)


def _dt_fake(demb, t, dim, max_period):
    return t.new_empty(t.shape, dtype=t.dtype if t.is_floating_point() else torch.float32)


def _setup(ctx, inputs, output):
    t, dim, max_period = inputs
    ctx.save_for_backward(t)
    ctx.args = (dim, max_period)


def _derivative(backward_op):
    def backward(ctx, demb):
        (t,) = ctx.saved_tensors
        return (backward_op(demb, t, *ctx.args) if ctx.needs_input_grad[0] else None), None, None
    return backward


BACKWARD = KernelSpec("timestep_embedding_backward", "(Tensor demb, Tensor t, int dim, float max_period) -> Tensor",
                      _dt_fake)
FORWARD = KernelSpec("timestep_embedding", "(Tensor t, int dim, float max_period) -> Tensor", _emb_fake, _setup,
                     _derivative, BACKWARD)

# The kernels take any real t (integer DDPM steps too; the public function refuses bool / complex).
# cpp: benchmarks/results/cpu-2core.md (AVX-512) and cpu-avx2-2core.md (avx2 variant); GPUs: host time
# per call (benchmarks/results/h200/host.log).
RANKS = {"cpp": {"cpu": 1}, "cuda": {"cuda": 2}, "triton": {"cuda": 1}}


# ---------------------------------------------------------------- compiled (cpp / cuda) backends
# Autograd: in C++ (csrc/timestep_embedding/autograd.cpp), the formula of _derivative.
_ext.bind(BACKWARD)
if (_compiled := _ext.bind(FORWARD)) is not None:
    _ext.register_compiled(OP, FORWARD.name, lambda t, dim, max_period: _compiled(t, dim, max_period), RANKS)


# ---------------------------------------------------------------- triton backend
if _triton.available():
    _tr_forward = _triton.bind(FORWARD, _triton.launcher("timestep_embedding", "forward"),
                               _triton.bind(BACKWARD, _triton.launcher("timestep_embedding", "backward")))
    _triton.register_triton(OP, lambda t, dim, max_period: _tr_forward(t, dim, max_period), RANKS["triton"])


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
    return select(OP, t).fn(t, dim, float(max_period))
