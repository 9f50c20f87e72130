"""Triton kernels for the flow-matching path, x0 noise, x1 data, t (B,), c = 1 - sigma_min:

    forward:   x_t = (1 - c t_b) x0 + t_b x1,          u_t = x1 - c x0
    backward:  dx0 = (1 - c t_b) dx_t - c du_t,        dx1 = t_b dx_t + du_t,
               dt_b = sum over the sample of dx_t (x1 - c x0)

Each sample is a row of a (B, N) matrix (unit inner stride, any row stride); a program covers a
(BLOCK_B, BLOCK_N) tile. Arithmetic in fp32, float64 when an input is float64. dt_b is summed per
program into a (B, column-blocks) table, then over its columns: no atomics, run-to-run identical.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._blocks import acc_dtype, cdiv, f64_join, f64_split, rows_view, tile_2d, tl_acc


@triton.jit
def fm_path_fwd(x0_ptr, x1_ptr, t_ptr, xt_ptr, ut_ptr, B, N, s_x0, s_x1, c_hi, c_lo,
                ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = rows.to(tl.int64)[:, None]
    mask = (rows < B)[:, None] & (cols < N)[None, :]
    c = f64_join(c_hi, c_lo, ACC)
    t = tl.load(t_ptr + rows, mask=rows < B).to(ACC)[:, None]
    x0 = tl.load(x0_ptr + r * s_x0 + cols[None, :], mask=mask).to(ACC)
    x1 = tl.load(x1_ptr + r * s_x1 + cols[None, :], mask=mask).to(ACC)
    out = r * N + cols[None, :]
    tl.store(xt_ptr + out, ((1.0 - c * t) * x0 + t * x1).to(xt_ptr.dtype.element_ty), mask=mask)
    tl.store(ut_ptr + out, (x1 - c * x0).to(ut_ptr.dtype.element_ty), mask=mask)


@triton.jit
def fm_path_bwd(dxt_ptr, dut_ptr, x0_ptr, x1_ptr, t_ptr, dx0_ptr, dx1_ptr, dt_part_ptr,
                B, N, s_dxt, s_dut, s_x0, s_x1, c_hi, c_lo, ACC: tl.constexpr,
                HAS_DXT: tl.constexpr, HAS_DUT: tl.constexpr, NEED_DT: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = rows.to(tl.int64)[:, None]
    mask = (rows < B)[:, None] & (cols < N)[None, :]
    c = f64_join(c_hi, c_lo, ACC)
    t = tl.load(t_ptr + rows, mask=rows < B).to(ACC)[:, None]
    gx = tl.zeros([BLOCK_B, BLOCK_N], ACC)
    gu = tl.zeros([BLOCK_B, BLOCK_N], ACC)
    if HAS_DXT:
        gx = tl.load(dxt_ptr + r * s_dxt + cols[None, :], mask=mask, other=0.0).to(ACC)
    if HAS_DUT:
        gu = tl.load(dut_ptr + r * s_dut + cols[None, :], mask=mask, other=0.0).to(ACC)
    out = r * N + cols[None, :]
    tl.store(dx0_ptr + out, ((1.0 - c * t) * gx - c * gu).to(dx0_ptr.dtype.element_ty), mask=mask)
    tl.store(dx1_ptr + out, (t * gx + gu).to(dx1_ptr.dtype.element_ty), mask=mask)
    if NEED_DT:
        x0 = tl.load(x0_ptr + r * s_x0 + cols[None, :], mask=mask, other=0.0).to(ACC)
        x1 = tl.load(x1_ptr + r * s_x1 + cols[None, :], mask=mask, other=0.0).to(ACC)
        part = tl.sum(gx * (x1 - c * x0), axis=1)
        tl.store(dt_part_ptr + rows.to(tl.int64) * tl.num_programs(1) + tl.program_id(1), part, mask=rows < B)


def forward(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, sigma_min: float):
    """(x_t, u_t), contiguous, in x1's dtype."""
    B = x1.shape[0]
    m0, m1 = rows_view(x0), rows_view(x1)
    N = m1.shape[1]
    acc = acc_dtype(x0, x1)
    t = t.to(acc).contiguous()
    x_t = torch.empty(x1.shape, dtype=x1.dtype, device=x1.device)
    u_t = torch.empty(x1.shape, dtype=x1.dtype, device=x1.device)
    bb, bn = tile_2d(B, N, x1.device)
    grid = (cdiv(B, bb), cdiv(N, bn))
    fm_path_fwd[grid](m0, m1, t, x_t, u_t, B, N, m0.stride(0), m1.stride(0), *f64_split(1.0 - sigma_min),
                      ACC=tl_acc(acc), BLOCK_B=bb, BLOCK_N=bn)
    return x_t, u_t


def backward(dx_t, du_t, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, sigma_min: float, need_dt: bool):
    """(dx0 in x0's dtype, dx1 in x1's dtype, dt in t's dtype or an empty tensor when not needed)."""
    B = x1.shape[0]
    acc = acc_dtype(x0, x1)
    tc = t.to(acc).contiguous()
    gx = rows_view(dx_t) if dx_t is not None else None
    gu = rows_view(du_t) if du_t is not None else None
    m0, m1 = rows_view(x0), rows_view(x1)
    N = m1.shape[1]
    dx0 = torch.empty(x1.shape, dtype=x0.dtype, device=x1.device)
    dx1 = torch.empty(x1.shape, dtype=x1.dtype, device=x1.device)
    bb, bn = tile_2d(B, N, x1.device)
    grid = (cdiv(B, bb), cdiv(N, bn))
    part = torch.empty((B, grid[1]) if need_dt else (0,), dtype=acc, device=x1.device)
    fm_path_bwd[grid](gx if gx is not None else m1, gu if gu is not None else m1, m0, m1, tc, dx0, dx1, part,
                      B, N, gx.stride(0) if gx is not None else 0, gu.stride(0) if gu is not None else 0,
                      m0.stride(0), m1.stride(0), *f64_split(1.0 - sigma_min), ACC=tl_acc(acc),
                      HAS_DXT=gx is not None, HAS_DUT=gu is not None, NEED_DT=need_dt, BLOCK_B=bb, BLOCK_N=bn)
    dt = part.sum(1).to(t.dtype) if need_dt else t.new_empty((0,))
    return dx0, dx1, dt
