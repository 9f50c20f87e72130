"""Triton kernels for sinusoidal timestep features, f_k = exp(-ln(max_period) k / half):

    forward:   emb[i] = [cos(t_i f_0), ..., cos(t_i f_{half-1}), sin(t_i f_0), ..., (0 if dim is odd)]
    backward:  dt_i = sum_k f_k (cos(t_i f_k) dsin_ik - sin(t_i f_k) dcos_ik)

t may be any real dtype (integer DDPM steps included); it is read as fp32, as in the reference,
and the table is fp32. The backward sums one row per program over all k: no atomics.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._blocks import cdiv, tile_2d


@triton.jit
def sinusoidal_fwd(t_ptr, out_ptr, N, HALF, DIM, s_t, neg_log_period_over_half,
                   ODD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    r = rows.to(tl.int64)[:, None]
    t = tl.load(t_ptr + rows.to(tl.int64) * s_t, mask=rows < N).to(tl.float32)
    freq = tl.exp(ks.to(tl.float32) * neg_log_period_over_half)
    arg = t[:, None] * freq[None, :]
    mask = (rows < N)[:, None] & (ks < HALF)[None, :]
    tl.store(out_ptr + r * DIM + ks[None, :], tl.cos(arg), mask=mask)
    tl.store(out_ptr + r * DIM + HALF + ks[None, :], tl.sin(arg), mask=mask)
    if ODD:
        if tl.program_id(1) == 0:
            tl.store(out_ptr + rows.to(tl.int64) * DIM + DIM - 1, tl.zeros([BLOCK_N], tl.float32), mask=rows < N)


@triton.jit
def sinusoidal_bwd(demb_ptr, t_ptr, dt_ptr, N, HALF, s_t, s_d0, s_d1, neg_log_period_over_half,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = rows.to(tl.int64)[:, None]
    t = tl.load(t_ptr + rows.to(tl.int64) * s_t, mask=rows < N).to(tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, HALF, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = (rows < N)[:, None] & (ks < HALF)[None, :]
        freq = tl.exp(ks.to(tl.float32) * neg_log_period_over_half)[None, :]
        arg = t[:, None] * freq
        dcos = tl.load(demb_ptr + r * s_d0 + ks[None, :] * s_d1, mask=mask, other=0.0).to(tl.float32)
        dsin = tl.load(demb_ptr + r * s_d0 + (HALF + ks[None, :]) * s_d1, mask=mask, other=0.0).to(tl.float32)
        acc += freq * (tl.cos(arg) * dsin - tl.sin(arg) * dcos)
    tl.store(dt_ptr + rows, tl.sum(acc, axis=1), mask=rows < N)


def _scale(dim: int, max_period: float) -> float:
    half = dim // 2
    return -math.log(max_period) / half if half else 0.0


def forward(t: torch.Tensor, dim: int, max_period: float) -> torch.Tensor:
    """(N,) -> (N, dim) float32, contiguous."""
    n, half = t.shape[0], dim // 2
    out = torch.empty((n, dim), dtype=torch.float32, device=t.device)
    bn, bk = tile_2d(n, max(half, 1), t.device)
    grid = (cdiv(n, bn), cdiv(max(half, 1), bk))
    sinusoidal_fwd[grid](t, out, n, half, dim, t.stride(0), _scale(dim, max_period),
                         ODD=dim % 2 == 1, BLOCK_N=bn, BLOCK_K=bk)
    return out


def backward(demb: torch.Tensor, t: torch.Tensor, dim: int, max_period: float) -> torch.Tensor:
    """d loss / d t in t's dtype (float32 for integer t), from d loss / d emb (N, dim), any strides."""
    n, half = t.shape[0], dim // 2
    dt = torch.empty((n,), dtype=torch.float32, device=t.device)
    bn, bk = tile_2d(n, max(half, 1), t.device)
    sinusoidal_bwd[(cdiv(n, bn),)](demb, t, dt, n, half, t.stride(0), demb.stride(0), demb.stride(1),
                                          _scale(dim, max_period), BLOCK_N=bn, BLOCK_K=bk)
    return dt.to(t.dtype) if t.is_floating_point() else dt

