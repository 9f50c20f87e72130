"""Triton kernels for the integrator updates, elementwise over flat contiguous arrays:

    euler_step:  x <- x + dt v                     (in place)
    rk_combine:  out = x + sum_i c_i k_i,  c_i = dt b_i,  up to MAX_STAGES stages per pass

Arithmetic in fp32 (float64 when an operand is float64), one rounding to the destination dtype.
Operands of another dtype than the destination are read as they are and converted in registers.
Element i of ``out`` depends only on element i of the inputs, read by the same program before it
writes, so ``out`` may be ``x`` or one of the stages. More stages than one pass takes accumulate in
a buffer of the accumulation dtype over several passes (k_0 first, the reference's order) and reach
``out`` in one final copy, so aliasing stays safe there too.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._blocks import acc_dtype, block_1d, cdiv, f64_join, f64_split, tl_acc

MAX_STAGES = 4   # RK4 and RK4 3/8 in one pass


@triton.jit
def euler_step(x_ptr, v_ptr, n, dt_hi, dt_lo, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(ACC)
    v = tl.load(v_ptr + offs, mask=mask).to(ACC)
    tl.store(x_ptr + offs, (x + f64_join(dt_hi, dt_lo, ACC) * v).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _axpy(acc, k_ptr, c_hi, c_lo, offs, mask, ACC: tl.constexpr, ON: tl.constexpr):
    if ON:
        acc += f64_join(c_hi, c_lo, ACC) * tl.load(k_ptr + offs, mask=mask).to(ACC)
    return acc


@triton.jit
def weighted_stage_sum(out_ptr, x_ptr, k0, k1, k2, k3, c0_hi, c0_lo, c1_hi, c1_lo, c2_hi, c2_lo,
                       c3_hi, c3_lo, n,
                       STAGES: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.load(x_ptr + offs, mask=mask).to(ACC)
    acc = _axpy(acc, k0, c0_hi, c0_lo, offs, mask, ACC, STAGES > 0)
    acc = _axpy(acc, k1, c1_hi, c1_lo, offs, mask, ACC, STAGES > 1)
    acc = _axpy(acc, k2, c2_hi, c2_lo, offs, mask, ACC, STAGES > 2)
    acc = _axpy(acc, k3, c3_hi, c3_lo, offs, mask, ACC, STAGES > 3)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def euler_step_(x: torch.Tensor, v: torch.Tensor, dt: float) -> None:
    """x += dt * v; a non-contiguous x is updated through a contiguous copy written back."""
    xc = x if x.is_contiguous() else x.contiguous()
    vc = v.contiguous()
    n = xc.numel()
    block = block_1d(n, x.device)
    euler_step[(cdiv(n, block),)](xc, vc, n, *f64_split(dt), ACC=tl_acc(acc_dtype(x, v)), BLOCK=block)
    if xc is not x:
        x.copy_(xc)


def _combine_pass(dst, src, ks, cs, acc):
    n = dst.numel()
    block = block_1d(n, dst.device)
    pad = MAX_STAGES - len(ks)
    weighted_stage_sum[(cdiv(n, block),)](dst, src, *ks, *([src] * pad),
                                                 *(h for c in cs for h in f64_split(c)), *([0.0] * (2 * pad)), n,
                                                 STAGES=len(ks), ACC=tl_acc(acc), BLOCK=block)


def rk_combine(out: torch.Tensor, x: torch.Tensor, ks: list[torch.Tensor], bs: list[float], dt: float) -> None:
    """out = x + dt * sum_i bs[i] ks[i]; stages with b_i = 0 are skipped (never read)."""
    terms = [(k.contiguous(), dt * b) for k, b in zip(ks, bs) if b != 0.0]
    xc = x.contiguous()
    if not terms:
        out.copy_(x)
        return
    acc = acc_dtype(out, x, *(k for k, _ in terms))
    if len(terms) <= MAX_STAGES:
        dst = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype, device=out.device)
        _combine_pass(dst, xc, [k for k, _ in terms], [c for _, c in terms], acc)
    else:
        dst = torch.empty(out.shape, dtype=acc, device=out.device)
        src = xc
        for j in range(0, len(terms), MAX_STAGES):
            group = terms[j:j + MAX_STAGES]
            _combine_pass(dst, src, [k for k, _ in group], [c for _, c in group], acc)
            src = dst
    if dst is not out:
        out.copy_(dst)
