"""Sinusoidal timestep features: ``[cos(t * f_k), sin(t * f_k)]`` with
``f_k = max_period ** (-k / half)``, ``k = 0 .. half - 1`` (DiT's convention; an odd ``dim``
gets one zero column). Output is float32 whatever ``t``'s dtype.

Contract: the reference is the oracle; fused backends match it within 1e-5 relative in fp32.
"""
from __future__ import annotations

import math

import torch

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
