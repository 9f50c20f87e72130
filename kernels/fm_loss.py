"""Triton kernels for the flow-matching loss, u = x1 - c x0 with c = 1 - sigma_min, never stored:

    per_sample_b = mean_i (v - u)^2,     loss = sum_b w_b per_sample_b / B,
    dv = 2 w_b (v - u) / (B N)           (the loss's gradient for an upstream 1, same pass)

Pass 1 (``fm_loss_partials``): each program reads a (BLOCK_B, BLOCK_N) tile of v, x0, x1 once,
writes its share of dv when asked and one partial sum of squares per row into a
(B, column-blocks) table. Pass 2 (``fm_loss_reduce``, one program): rows of the table -> per_sample
and the weighted mean. Fixed tiles and no atomics: the loss and dv are identical run to run.
Arithmetic in fp32 (float64 when an input is float64); dv, per_sample and loss in that dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._blocks import acc_dtype, cdiv, f64_join, f64_split, rows_view, tile_2d, tl_acc


@triton.jit
def fm_loss_partials(v_ptr, x0_ptr, x1_ptr, w_ptr, dv_ptr, part_ptr, B, N, s_v, s_x0, s_x1,
                     c_hi, c_lo, dvs_hi, dvs_lo, ACC: tl.constexpr, HAS_W: tl.constexpr,
                     WRITE_DV: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = rows.to(tl.int64)[:, None]
    mask = (rows < B)[:, None] & (cols < N)[None, :]
    c = f64_join(c_hi, c_lo, ACC)
    v = tl.load(v_ptr + r * s_v + cols[None, :], mask=mask, other=0.0).to(ACC)
    x0 = tl.load(x0_ptr + r * s_x0 + cols[None, :], mask=mask, other=0.0).to(ACC)
    x1 = tl.load(x1_ptr + r * s_x1 + cols[None, :], mask=mask, other=0.0).to(ACC)
    diff = v - (x1 - c * x0)
    if WRITE_DV:
        g = diff * f64_join(dvs_hi, dvs_lo, ACC)
        if HAS_W:
            g = g * tl.load(w_ptr + rows, mask=rows < B, other=0.0).to(ACC)[:, None]
        tl.store(dv_ptr + r * N + cols[None, :], g, mask=mask)
    part = tl.sum(diff * diff, axis=1)
    tl.store(part_ptr + rows.to(tl.int64) * tl.num_programs(1) + tl.program_id(1), part, mask=rows < B)


@triton.jit
def fm_loss_reduce(part_ptr, w_ptr, per_sample_ptr, loss_ptr, B, P, inv_n_hi, inv_n_lo, inv_b_hi, inv_b_lo,
                   ACC: tl.constexpr, HAS_W: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr):
    total = tl.zeros([BLOCK_B], ACC)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        acc = tl.zeros([BLOCK_B, BLOCK_P], ACC)
        for p0 in range(0, P, BLOCK_P):
            cols = p0 + tl.arange(0, BLOCK_P)
            mask = (rows < B)[:, None] & (cols < P)[None, :]
            acc += tl.load(part_ptr + rows.to(tl.int64)[:, None] * P + cols[None, :], mask=mask, other=0.0)
        ps = tl.sum(acc, axis=1) * f64_join(inv_n_hi, inv_n_lo, ACC)
        tl.store(per_sample_ptr + rows, ps, mask=rows < B)
        if HAS_W:
            ps = ps * tl.load(w_ptr + rows, mask=rows < B, other=0.0).to(ACC)
        total += ps
    tl.store(loss_ptr + tl.arange(0, 1), tl.sum(total, axis=0) * f64_join(inv_b_hi, inv_b_lo, ACC))


def forward(v: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor, weight: torch.Tensor | None, sigma_min: float,
            need_grad: bool):
    """(loss, per_sample (B,), dv or an empty tensor), all in the accumulation dtype."""
    B = x1.shape[0]
    mv, m0, m1 = rows_view(v), rows_view(x0), rows_view(x1)
    N = m1.shape[1]
    acc = acc_dtype(v, x0, x1)
    ACC = tl_acc(acc)
    w = weight.contiguous() if weight is not None else None
    dev = x1.device
    dv = torch.empty(v.shape if need_grad else (0,), dtype=acc, device=dev)
    bb, bn = tile_2d(B, N, dev)
    grid = (cdiv(B, bb), cdiv(N, bn))
    part = torch.empty((B, grid[1]), dtype=acc, device=dev)
    fm_loss_partials[grid](mv, m0, m1, w if w is not None else part, dv, part, B, N,
                           mv.stride(0), m0.stride(0), m1.stride(0), *f64_split(1.0 - sigma_min),
                           *f64_split(2.0 / (B * N)),
                           ACC=ACC, HAS_W=w is not None, WRITE_DV=need_grad, BLOCK_B=bb, BLOCK_N=bn)
    per_sample = torch.empty((B,), dtype=acc, device=dev)
    loss = torch.empty((), dtype=acc, device=dev)
    rb, rp = tile_2d(B, grid[1], dev)
    fm_loss_reduce[(1,)](part, w if w is not None else part, per_sample, loss, B, grid[1], *f64_split(1.0 / N),
                         *f64_split(1.0 / B),
                         ACC=ACC, HAS_W=w is not None, BLOCK_B=rb, BLOCK_P=rp)
    return loss, per_sample, dv

