"""Triton kernels of ``gated_residual`` and the fused ``gated_residual_norm_modulate``.

``r = res + gate[b] * h``, gate (B, D) broadcast over T (rows (N, D): T = 1), in res's dtype.
The fused chain also returns ``y = act(norm(r) * (1 + scale) + shift)`` (token kinds, the math of
:mod:`flowfm_fast.kernels.norm_modulate`; the tile functions of :mod:`.norm_tokens`) from the same
pass: res and h are read once, r and y written once. The norm sees r rounded to res's dtype,
exactly as the unfused chain does.

Backward: dh = dr * gate, dgate[b] = sum_t dr * h, where dr = dy_r (+ the norm's dx for the fused
chain). dgate, dshift, dscale, dweight, dbias use the per-program partial sums plus one fixed-order
reduction of :func:`_blocks.row_partition` (no atomics, deterministic).

Layouts: res, h, dy and dnew_res are read through their strides; outputs are contiguous; gate
and the modulation / affine vectors are made contiguous (they are small).

Contract: fp32 within 1e-5 relative of the float64 formula (gradients 1e-4 after reductions);
bf16 / fp16 within the Liger-style tolerances. ``gated_residual`` forward and dh are one fp32
multiply(-add) per element, rounded once to the output dtype (an FMA on GPUs, where Triton
contracts), so they differ from the reference by at most that rounding; the fused norm output and
every reduced gradient are close, not bit-exact, versus the reference. Every result is bit-exact
run to run for the same shapes on the same device kind (no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._blocks import (ACTS, acc_dtype, cdiv, device_ctx, finish_grads, has_flags, load_affine, load_mod, num_warps,
                      row_dims, row_partition, row_strides, row_tiles, rsum, small, sum01, sum_partials, tl_acc,
                      warps_for)
from .norm_tokens import token_bwd_tile, token_fwd_tile


@triton.jit
def _gr_fwd(RES, H, GATE, OUT, R, T, D, sr_b, sr_t, sr_d, sh_b, sh_t, sh_d,
            ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    m2 = (rows < R)[:, None] & (cols < D)[None, :]
    b = rows // T
    t = rows % T
    res = tl.load(RES + (b * sr_b + t * sr_t)[:, None] + cols[None, :] * sr_d, mask=m2, other=0.0).to(ACC)
    h = tl.load(H + (b * sh_b + t * sh_t)[:, None] + cols[None, :] * sh_d, mask=m2, other=0.0).to(ACC)
    g = tl.load(GATE + b[:, None] * D + cols[None, :], mask=m2, other=0.0).to(ACC)
    tl.store(OUT + rows[:, None] * D + cols[None, :], (res + g * h).to(OUT.dtype.element_ty), mask=m2)


@triton.jit
def _gr_bwd(DY, H, GATE, DH, DGATE_P, B, T, D, bchunk, chunk, nchunk, sd_b, sd_t, sd_d, sh_b, sh_t, sh_d,
            ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Tiles and partials of :func:`_blocks.row_partition`: dgate as (B, nchunk, D) partials."""
    p = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    b_end = tl.minimum(p * bchunk + bchunk, B)
    t_end = tl.minimum(c * chunk + chunk, T)
    di = tl.arange(0, BLOCK_D)[None, None, :]
    d2 = tl.arange(0, BLOCK_D)[None, :]
    for b0 in range(p * bchunk, b_end, BLOCK_B):
        bi = b0 + tl.arange(0, BLOCK_B)[:, None, None]
        mm = (bi < b_end) & (di < D)
        gate = tl.load(GATE + bi * D + di, mask=mm, other=0.0).to(ACC)
        dg_acc = tl.zeros([BLOCK_B, BLOCK_D], ACC)
        for t0 in range(c * chunk, t_end, BLOCK_T):
            ti = t0 + tl.arange(0, BLOCK_T)[None, :, None]
            m3 = mm & (ti < t_end)
            dy = tl.load(DY + bi * sd_b + ti * sd_t + di * sd_d, mask=m3, other=0.0).to(ACC)
            h = tl.load(H + bi * sh_b + ti * sh_t + di * sh_d, mask=m3, other=0.0).to(ACC)
            tl.store(DH + (bi * T + ti) * D + di, (dy * gate).to(DH.dtype.element_ty), mask=m3)
            dg_acc += rsum(dy * h, axis=1)
        b2 = b0 + tl.arange(0, BLOCK_B)[:, None]
        tl.store(DGATE_P + (b2 * nchunk + c) * D + d2, dg_acc, mask=(b2 < b_end) & (d2 < D))


@triton.jit
def _grnm_fwd(RES, H, GATE, SHIFT, SCALE, W, BIAS, NEW_RES, Y, MEAN, RSTD, R, T, D,
              sr_b, sr_t, sr_d, sh_b, sh_t, sh_d, eps,
              RMS: tl.constexpr, ACT: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr,
              HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rm = rows < R
    cm = cols < D
    m2 = rm[:, None] & cm[None, :]
    b = rows // T
    t = rows % T
    res = tl.load(RES + (b * sr_b + t * sr_t)[:, None] + cols[None, :] * sr_d, mask=m2, other=0.0).to(ACC)
    h = tl.load(H + (b * sh_b + t * sh_t)[:, None] + cols[None, :] * sh_d, mask=m2, other=0.0).to(ACC)
    mod_off = b[:, None] * D + cols[None, :]
    gate = tl.load(GATE + mod_off, mask=m2, other=0.0).to(ACC)
    # The norm sees the stored (rounded) residual, as the unfused chain does.
    r = (res + gate * h).to(NEW_RES.dtype.element_ty)
    out_off = rows[:, None] * D + cols[None, :]
    tl.store(NEW_RES + out_off, r, mask=m2)
    w, bias = load_affine(W, BIAS, cols[None, :], cm[None, :], HAS_W, HAS_BIAS, ACC)
    shift, scale = load_mod(SHIFT, SCALE, mod_off, m2, HAS_SHIFT, HAS_SCALE, ACC)
    y, mean, rstd = token_fwd_tile(tl.where(m2, r.to(ACC), 0.0), m2, D, eps, w, bias, shift, scale, RMS, ACT, ACC)
    tl.store(Y + out_off, y.to(Y.dtype.element_ty), mask=m2)
    tl.store(MEAN + rows, mean, mask=rm)
    tl.store(RSTD + rows, rstd, mask=rm)


@triton.jit
def _grnm_bwd(DNEW_RES, DY, NEW_RES, H, GATE, MEAN, RSTD, SHIFT, SCALE, W, BIAS,
              DRES, DH, DGATE_P, DSHIFT_P, DSCALE_P, DW_P, DB_P,
              B, T, D, bchunk, chunk, nchunk, sn_b, sn_t, sn_d, sd_b, sd_t, sd_d, sh_b, sh_t, sh_d,
              RMS: tl.constexpr, ACT: tl.constexpr, HAS_DNEW: tl.constexpr, HAS_SHIFT: tl.constexpr,
              HAS_SCALE: tl.constexpr, HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
              BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """The token backward of norm_modulate on r, then dr += dnew_res; dres = dr, dh = dr * gate,
    dgate = sum_t dr * h. NEW_RES is contiguous (our own forward output); DNEW_RES, DY and H are
    read by strides. Partials as in :func:`_blocks.row_partition`."""
    p = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    b_end = tl.minimum(p * bchunk + bchunk, B)
    t_end = tl.minimum(c * chunk + chunk, T)
    di = tl.arange(0, BLOCK_D)[None, None, :]
    d2 = tl.arange(0, BLOCK_D)[None, :]
    w, bias = load_affine(W, BIAS, di, di < D, HAS_W, HAS_BIAS, ACC)
    dw_acc = tl.zeros([BLOCK_D], ACC)
    db_acc = tl.zeros([BLOCK_D], ACC)
    for b0 in range(p * bchunk, b_end, BLOCK_B):
        bi = b0 + tl.arange(0, BLOCK_B)[:, None, None]
        mm = (bi < b_end) & (di < D)
        shift, scale = load_mod(SHIFT, SCALE, bi * D + di, mm, HAS_SHIFT, HAS_SCALE, ACC)
        gate = tl.load(GATE + bi * D + di, mask=mm, other=0.0).to(ACC)
        dsh_acc = tl.zeros([BLOCK_B, BLOCK_D], ACC)
        dsc_acc = tl.zeros([BLOCK_B, BLOCK_D], ACC)
        dg_acc = tl.zeros([BLOCK_B, BLOCK_D], ACC)
        for t0 in range(c * chunk, t_end, BLOCK_T):
            ti = t0 + tl.arange(0, BLOCK_T)[None, :, None]
            rm = (bi < b_end) & (ti < t_end)
            m3 = mm & (ti < t_end)
            rows = bi * T + ti
            x = tl.load(NEW_RES + rows * D + di, mask=m3, other=0.0).to(ACC)
            dy = tl.load(DY + bi * sd_b + ti * sd_t + di * sd_d, mask=m3, other=0.0).to(ACC)
            h = tl.load(H + bi * sh_b + ti * sh_t + di * sh_d, mask=m3, other=0.0).to(ACC)
            mean = tl.load(MEAN + rows, mask=rm, other=0.0).to(ACC)
            rstd = tl.load(RSTD + rows, mask=rm, other=0.0).to(ACC)
            dr, gu, a, dw_t, db_t = token_bwd_tile(x, dy, mean, rstd, w, bias, shift, scale, m3, D, RMS, ACT)
            if HAS_DNEW:
                dr += tl.load(DNEW_RES + bi * sn_b + ti * sn_t + di * sn_d, mask=m3, other=0.0).to(ACC)
            tl.store(DRES + rows * D + di, dr.to(DRES.dtype.element_ty), mask=m3)
            tl.store(DH + rows * D + di, (dr * gate).to(DH.dtype.element_ty), mask=m3)
            dg_acc += rsum(dr * h, axis=1)
            dsh_acc += rsum(gu, axis=1)
            dsc_acc += rsum(gu * a, axis=1)
            dw_acc += sum01(dw_t)
            db_acc += sum01(db_t)
        b2 = b0 + tl.arange(0, BLOCK_B)[:, None]
        slot = (b2 * nchunk + c) * D + d2
        m2 = (b2 < b_end) & (d2 < D)
        tl.store(DGATE_P + slot, dg_acc, mask=m2)
        if HAS_SHIFT:
            tl.store(DSHIFT_P + slot, dsh_acc, mask=m2)
        if HAS_SCALE:
            tl.store(DSCALE_P + slot, dsc_acc, mask=m2)
    cols = tl.arange(0, BLOCK_D)
    if HAS_W:
        tl.store(DW_P + (p * nchunk + c) * D + cols, dw_acc, mask=cols < D)
    if HAS_BIAS:
        tl.store(DB_P + (p * nchunk + c) * D + cols, db_acc, mask=cols < D)


# ----------------------------------------------------------------------------- launches


def gated_residual_forward(res, h, gate):
    acc = acc_dtype(res)
    gate = gate.contiguous()
    out = torch.empty(res.shape, dtype=res.dtype, device=res.device)
    B, T, D = row_dims(res)
    block_r, block_d = row_tiles(B * T, D)
    with device_ctx(res):
        _gr_fwd[(cdiv(B * T, block_r),)](res, h, gate, out, B * T, T, D, *row_strides(res), *row_strides(h),
                                                ACC=tl_acc(acc), BLOCK_R=block_r, BLOCK_D=block_d,
                                                num_warps=warps_for(block_r * block_d))
    return out


def gated_residual_backward(dy, h, gate):
    """(dh in h's dtype, dgate in gate's dtype)."""
    acc = acc_dtype(h)
    gate_c = gate.contiguous()
    B, T, D = row_dims(h)
    P = row_partition(B, T, D)
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    dgate = torch.empty((B, P.nchunk, D), dtype=acc, device=h.device)
    with device_ctx(h):
        _gr_bwd[(P.nbp, P.nchunk)](dy, h, gate_c, dh, dgate, B, T, D, P.bchunk, P.chunk, P.nchunk, *row_strides(dy),
                                   *row_strides(h), ACC=tl_acc(acc), BLOCK_B=P.block_b, BLOCK_T=P.block_t,
                                   BLOCK_D=P.block_d, num_warps=num_warps(P.block_b * P.block_t * P.block_d))
    dgate = sum_partials(dgate, 1)
    return dh, dgate.to(gate.dtype)


def fused_forward(res, h, gate, shift, scale, weight, bias, kind: str, eps: float, act: str | None):
    """(new_res, y, mean, rstd): new_res and y in res's dtype, mean / rstd (R,) in the accumulation dtype."""
    acc = acc_dtype(res)
    gate, shift, scale, weight, bias = (small(t) for t in (gate, shift, scale, weight, bias))
    B, T, D = row_dims(res)
    R = B * T
    new_res = torch.empty(res.shape, dtype=res.dtype, device=res.device)
    y = torch.empty_like(new_res)
    mean = torch.empty((R,), dtype=acc, device=res.device)
    rstd = torch.empty_like(mean)
    block_r, block_d = row_tiles(R, D)
    with device_ctx(res):
        _grnm_fwd[(cdiv(R, block_r),)](res, h, gate, shift, scale, weight, bias, new_res, y, mean, rstd,
                                              R, T, D, *row_strides(res), *row_strides(h), eps, RMS=kind == "rms",
                                              ACT=ACTS[act], ACC=tl_acc(acc), BLOCK_R=block_r, BLOCK_D=block_d,
                                              num_warps=warps_for(block_r * block_d),
                                              **has_flags(shift, scale, weight, bias))
    return new_res, y, mean, rstd


def fused_backward(dnew_res, dy, new_res, h, gate, mean, rstd, shift, scale, weight, bias, kind: str,
                   act: str | None):
    """(dres, dh, dgate, dshift, dscale, dweight, dbias), each in its input's dtype (dres in
    new_res's, which is res's); an empty tensor where an optional input was None."""
    acc = acc_dtype(new_res)
    gate_c, shift, scale, weight, bias = (small(t) for t in (gate, shift, scale, weight, bias))
    new_res = new_res.contiguous()
    mean, rstd = mean.to(acc).contiguous(), rstd.to(acc).contiguous()
    B, T, D = row_dims(new_res)
    P = row_partition(B, T, D)
    new = lambda *shape: torch.empty(shape, dtype=acc, device=new_res.device)  # noqa: E731
    dres = torch.empty_like(new_res)
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    dgate = new(B, P.nchunk, D)
    dshift = new(B, P.nchunk, D) if shift is not None else None
    dscale = new(B, P.nchunk, D) if scale is not None else None
    dw_p = new(P.nbp * P.nchunk, D) if weight is not None else None
    db_p = new(P.nbp * P.nchunk, D) if bias is not None else None
    dn = dnew_res if dnew_res is not None else dy  # a stand-in pointer, never read without HAS_DNEW
    with device_ctx(new_res):
        _grnm_bwd[(P.nbp, P.nchunk)](dn, dy, new_res, h, gate_c, mean, rstd, shift, scale, weight, bias,
                                     dres, dh, dgate, dshift, dscale, dw_p, db_p, B, T, D, P.bchunk, P.chunk,
                                     P.nchunk, *row_strides(dn), *row_strides(dy), *row_strides(h),
                                     RMS=kind == "rms", ACT=ACTS[act], HAS_DNEW=dnew_res is not None,
                                     ACC=tl_acc(acc),
                                     BLOCK_B=P.block_b, BLOCK_T=P.block_t, BLOCK_D=P.block_d,
                                     num_warps=num_warps(P.block_b * P.block_t * P.block_d),
                                     **has_flags(shift, scale, weight, bias))
    dgate = sum_partials(dgate, 1).to(gate.dtype)
    return (dres, dh, dgate, *finish_grads(new_res, dshift, dscale, dw_p, db_p, shift, scale, weight, bias, 1))
