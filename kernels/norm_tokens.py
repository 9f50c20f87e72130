"""Triton kernels of ``norm_modulate``'s token kinds (``layer`` / ``rms``) and their launches; the
math, layouts and contract are in :mod:`flowfm_fast.kernels.norm_modulate`, which dispatches here.

x is viewed as R rows of D features (tokens (B, T, D): R = B * T, row r belongs to sample r // T;
rows (N, D): T = 1). Forward: tiles of whole rows (:func:`_blocks.row_tiles`). Backward, without
atomics: dx needs only its own row; program (p, c) of :func:`_blocks.row_partition` owns a block
of samples and a chunk of their tokens, walks them in (samples, tokens, features) tiles, and
writes its sums to its own slots: dshift / dscale as (B, nchunk, D) partials, dweight / dbias as
(programs, D) partials, which a second, fixed-order ``sum`` finishes (:func:`_blocks.finish_grads`).

The tile functions :func:`token_fwd_tile` and :func:`token_bwd_tile` are shared with the fused
residual kernels of :mod:`flowfm_fast.kernels.gated_residual`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._blocks import (ACTS, acc_dtype, act_fwd, act_grad, cdiv, device_ctx, device_fn, finish_grads, has_flags,
                      inv_sqrt, load_affine, load_mod, num_warps, row_dims, row_partition, row_strides, row_tiles,
                      rsum, small, sum01, tl_acc, warps_for)


@device_fn
def token_fwd_tile(x, m2, D, eps, w, bias, shift, scale, RMS: tl.constexpr, ACT: tl.constexpr,
                   ACC: tl.constexpr):
    """One tile of rows (x in the accumulation dtype, masked lanes 0): (y, mean, rstd). Shared
    with the fused residual kernel."""
    if RMS:
        mean = rsum(tl.zeros_like(x), axis=1)
    else:
        mean = rsum(x, axis=1) / D
    xc = tl.where(m2, x - mean[:, None], 0.0)
    rstd = inv_sqrt(rsum(xc * xc, axis=1) / D + eps, ACC)
    a = (xc * rstd[:, None]) * w + bias
    y = act_fwd(a * (1.0 + scale) + shift, ACT)
    return y, mean, rstd


@triton.jit
def _token_fwd(X, Y, SHIFT, SCALE, W, BIAS, MEAN, RSTD, R, T, D, sx_b, sx_t, sx_d, eps,
               RMS: tl.constexpr, ACT: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr,
               HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rm = rows < R
    cm = cols < D
    m2 = rm[:, None] & cm[None, :]
    b = rows // T
    x = tl.load(X + (b * sx_b + (rows % T) * sx_t)[:, None] + cols[None, :] * sx_d, mask=m2, other=0.0).to(ACC)
    w, bias = load_affine(W, BIAS, cols[None, :], cm[None, :], HAS_W, HAS_BIAS, ACC)
    shift, scale = load_mod(SHIFT, SCALE, b[:, None] * D + cols[None, :], m2, HAS_SHIFT, HAS_SCALE, ACC)
    y, mean, rstd = token_fwd_tile(x, m2, D, eps, w, bias, shift, scale, RMS, ACT, ACC)
    tl.store(Y + rows[:, None] * D + cols[None, :], y.to(Y.dtype.element_ty), mask=m2)
    tl.store(MEAN + rows, mean, mask=rm)
    tl.store(RSTD + rows, rstd, mask=rm)


@device_fn
def token_bwd_tile(x, dy, mean, rstd, w, bias, shift, scale, m3, D, RMS: tl.constexpr, ACT: tl.constexpr):
    """One (samples, tokens, features) tile: (dx, gu, a, da * xhat, da) in the accumulation dtype,
    masked lanes 0; shared with the fused residual kernel. x is the normalised input, dy the
    gradient of y, mean / rstd (BB, BT, 1), w / bias (1, 1, BD), shift / scale (BB, 1, BD)."""
    xhat = tl.where(m3, (x - mean) * rstd, 0.0)
    a = xhat * w + bias
    one_plus = 1.0 + scale
    gu = dy
    if ACT != 0:
        gu = tl.where(m3, gu * act_grad(a * one_plus + shift, ACT), 0.0)
    da = gu * one_plus
    dxhat = da * w
    c2 = rsum(dxhat * xhat, axis=2)[:, :, None] / D
    if RMS:
        dx = rstd * (dxhat - xhat * c2)
    else:
        c1 = rsum(dxhat, axis=2)[:, :, None] / D
        dx = rstd * (dxhat - c1 - xhat * c2)
    return dx, gu, a, da * xhat, da


@triton.jit
def _token_bwd(DY, X, MEAN, RSTD, SHIFT, SCALE, W, BIAS, DX, DSHIFT_P, DSCALE_P, DW_P, DB_P,
               B, T, D, bchunk, chunk, nchunk, sx_b, sx_t, sx_d, sd_b, sd_t, sd_d,
               RMS: tl.constexpr, ACT: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr,
               HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
               BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    b_start = p * bchunk
    b_end = tl.minimum(b_start + bchunk, B)
    t_start = c * chunk
    t_end = tl.minimum(t_start + chunk, T)
    di = tl.arange(0, BLOCK_D)[None, None, :]
    w, bias = load_affine(W, BIAS, di, di < D, HAS_W, HAS_BIAS, ACC)
    d2 = tl.arange(0, BLOCK_D)[None, :]
    dw_acc = tl.zeros([BLOCK_D], ACC)
    db_acc = tl.zeros([BLOCK_D], ACC)
    for b0 in range(b_start, b_end, BLOCK_B):
        bi = b0 + tl.arange(0, BLOCK_B)[:, None, None]
        mm = (bi < b_end) & (di < D)
        mod_off = bi * D + di
        shift, scale = load_mod(SHIFT, SCALE, mod_off, mm, HAS_SHIFT, HAS_SCALE, ACC)
        dsh_acc = tl.zeros([BLOCK_B, BLOCK_D], ACC)
        dsc_acc = tl.zeros([BLOCK_B, BLOCK_D], ACC)
        for t0 in range(t_start, t_end, BLOCK_T):
            ti = t0 + tl.arange(0, BLOCK_T)[None, :, None]
            m3 = mm & (ti < t_end)
            rows = bi * T + ti
            x = tl.load(X + bi * sx_b + ti * sx_t + di * sx_d, mask=m3, other=0.0).to(ACC)
            dy = tl.load(DY + bi * sd_b + ti * sd_t + di * sd_d, mask=m3, other=0.0).to(ACC)
            mean = tl.load(MEAN + rows, mask=(bi < b_end) & (ti < t_end), other=0.0).to(ACC)
            rstd = tl.load(RSTD + rows, mask=(bi < b_end) & (ti < t_end), other=0.0).to(ACC)
            dx, gu, a, dw_t, db_t = token_bwd_tile(x, dy, mean, rstd, w, bias, shift, scale, m3, D, RMS, ACT)
            tl.store(DX + rows * D + di, dx.to(DX.dtype.element_ty), mask=m3)
            dsh_acc += rsum(gu, axis=1)
            dsc_acc += rsum(gu * a, axis=1)
            dw_acc += sum01(dw_t)
            db_acc += sum01(db_t)
        b2 = b0 + tl.arange(0, BLOCK_B)[:, None]
        slot = (b2 * nchunk + c) * D + d2
        if HAS_SHIFT:
            tl.store(DSHIFT_P + slot, dsh_acc, mask=(b2 < b_end) & (d2 < D))
        if HAS_SCALE:
            tl.store(DSCALE_P + slot, dsc_acc, mask=(b2 < b_end) & (d2 < D))
    slot = (p * nchunk + c) * D + tl.arange(0, BLOCK_D)
    if HAS_W:
        tl.store(DW_P + slot, dw_acc, mask=tl.arange(0, BLOCK_D) < D)
    if HAS_BIAS:
        tl.store(DB_P + slot, db_acc, mask=tl.arange(0, BLOCK_D) < D)



# ----------------------------------------------------------------------------- launches


def forward(x, shift, scale, weight, bias, kind: str, eps: float, act: str | None):
    """(y, mean, rstd): y in x's dtype, mean / rstd (R,) in the accumulation dtype."""
    acc = acc_dtype(x)
    shift, scale, weight, bias = small(shift), small(scale), small(weight), small(bias)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    B, T, D = row_dims(x)
    R = B * T
    mean = torch.empty((R,), dtype=acc, device=x.device)
    rstd = torch.empty_like(mean)
    block_r, block_d = row_tiles(R, D)
    with device_ctx(x):
        _token_fwd[(cdiv(R, block_r),)](x, y, shift, scale, weight, bias, mean, rstd, R, T, D,
                                        *row_strides(x), eps, RMS=kind == "rms", ACT=ACTS[act],
                                        ACC=tl_acc(acc), BLOCK_R=block_r, BLOCK_D=block_d,
                                        num_warps=warps_for(block_r * block_d), **has_flags(shift, scale, weight, bias))
    return y, mean, rstd


def backward(dy, x, mean, rstd, shift, scale, weight, bias, kind: str, act: str | None):
    """(dx, dshift, dscale, dweight, dbias), each in its input's dtype; an empty tensor where the
    input was None."""
    acc = acc_dtype(x)
    shift, scale, weight, bias = small(shift), small(scale), small(weight), small(bias)
    mean, rstd = mean.to(acc).contiguous(), rstd.to(acc).contiguous()
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    new = lambda *shape: torch.empty(shape, dtype=acc, device=x.device)  # noqa: E731
    B, T, D = row_dims(x)
    P = row_partition(B, T, D)
    dshift = new(B, P.nchunk, D) if shift is not None else None
    dscale = new(B, P.nchunk, D) if scale is not None else None
    dw_p = new(P.nbp * P.nchunk, D) if weight is not None else None
    db_p = new(P.nbp * P.nchunk, D) if bias is not None else None
    with device_ctx(x):
        _token_bwd[(P.nbp, P.nchunk)](dy, x, mean, rstd, shift, scale, weight, bias, dx, dshift, dscale, dw_p,
                                      db_p, B, T, D, P.bchunk, P.chunk, P.nchunk, *row_strides(x),
                                      *row_strides(dy), RMS=kind == "rms", ACT=ACTS[act], ACC=tl_acc(acc),
                                      BLOCK_B=P.block_b, BLOCK_T=P.block_t, BLOCK_D=P.block_d,
                                      num_warps=num_warps(P.block_b * P.block_t * P.block_d),
                                      **has_flags(shift, scale, weight, bias))
    return (dx, *finish_grads(x, dshift, dscale, dw_p, db_p, shift, scale, weight, bias, 1))
