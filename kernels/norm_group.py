"""Triton kernels of ``norm_modulate``'s group kind (GroupNorm, ``group``) and their launches; the
math, layouts and contract are in :mod:`flowfm_fast.kernels.norm_modulate`, which dispatches here.

x (B, C, L), statistics over each of G groups of C / G channels times L, modulation (B, C)
broadcast over L. Groups that fit a tile are held whole, several per program
(:func:`_group_fwd_whole`, :func:`_group_bwd_whole`: x read once); a larger group gets one
program per (sample, group) looping over channel and position blocks (:func:`_group_fwd`,
:func:`_group_bwd`). Backward, without atomics: each program writes dshift / dscale directly and
dweight / dbias as (B, C) partials, which a fixed-order ``sum`` over B finishes
(:func:`_blocks.finish_grads`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._blocks import (ACTS, acc_dtype, act_fwd, act_grad, cdiv, device_ctx, device_fn, finish_grads, has_flags,
                      inv_sqrt, next_pow2, norm_tile, rsum, small, tl_acc, warps_for)

# Forward, from a launch sweep on an H200 (benchmarks/gpu_tune_norm.py, results in
# benchmarks/results/h200/): a group of up to 8K elements held whole by one program, so x is read
# once, ran at 93% of the copy bandwidth in fp32 (looping over blocks of the group: 62%).
GPU_GROUP_TILE = 8192
# Backward (tiles of _blocks.GPU_BWD_TILE), same H200 sweep: 16 values per thread did best
# (423 us against 611 us at 32).
GROUP_BWD_PER_THREAD = 16


@triton.jit
def _group_fwd(X, Y, SHIFT, SCALE, W, BIAS, MEAN, RSTD, C, L, G, sx_b, sx_c, sx_l, eps,
               ACT: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_W: tl.constexpr,
               HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    bg = tl.program_id(0).to(tl.int64)
    b = bg // G
    cg = C // G
    c_first = (bg % G) * cg
    n = cg * L
    ci = tl.arange(0, BLOCK_C)
    li = tl.arange(0, BLOCK_L)
    base = X + b * sx_b
    # Two passes for the statistics (mean, then squared deviations), as the reference does.
    s = tl.zeros([BLOCK_C, BLOCK_L], ACC)
    for c0 in range(0, cg, BLOCK_C):
        ch = c_first + c0 + ci
        chm = (c0 + ci) < cg
        for l0 in range(0, L, BLOCK_L):
            m2 = chm[:, None] & ((l0 + li) < L)[None, :]
            s += tl.load(base + ch[:, None] * sx_c + (l0 + li)[None, :] * sx_l, mask=m2, other=0.0).to(ACC)
    mean = rsum(rsum(s, axis=1), axis=0) / n
    s = tl.zeros([BLOCK_C, BLOCK_L], ACC)
    for c0 in range(0, cg, BLOCK_C):
        ch = c_first + c0 + ci
        chm = (c0 + ci) < cg
        for l0 in range(0, L, BLOCK_L):
            m2 = chm[:, None] & ((l0 + li) < L)[None, :]
            x = tl.load(base + ch[:, None] * sx_c + (l0 + li)[None, :] * sx_l, mask=m2, other=0.0).to(ACC)
            xc = tl.where(m2, x - mean, 0.0)
            s += xc * xc
    rstd = inv_sqrt(rsum(rsum(s, axis=1), axis=0) / n + eps, ACC)
    for c0 in range(0, cg, BLOCK_C):
        ch = c_first + c0 + ci
        chm = (c0 + ci) < cg
        if HAS_W:
            w = tl.load(W + ch, mask=chm, other=0.0).to(ACC)
        else:
            w = tl.full([BLOCK_C], 1.0, ACC)
        if HAS_BIAS:
            bias = tl.load(BIAS + ch, mask=chm, other=0.0).to(ACC)
        else:
            bias = tl.zeros([BLOCK_C], ACC)
        if HAS_SCALE:
            one_plus = 1.0 + tl.load(SCALE + b * C + ch, mask=chm, other=0.0).to(ACC)
        else:
            one_plus = tl.full([BLOCK_C], 1.0, ACC)
        if HAS_SHIFT:
            shift = tl.load(SHIFT + b * C + ch, mask=chm, other=0.0).to(ACC)
        else:
            shift = tl.zeros([BLOCK_C], ACC)
        for l0 in range(0, L, BLOCK_L):
            lm = (l0 + li) < L
            m2 = chm[:, None] & lm[None, :]
            x = tl.load(base + ch[:, None] * sx_c + (l0 + li)[None, :] * sx_l, mask=m2, other=0.0).to(ACC)
            u = (((x - mean) * rstd) * w[:, None] + bias[:, None]) * one_plus[:, None] + shift[:, None]
            y = act_fwd(u, ACT)
            tl.store(Y + (b * C + ch)[:, None] * L + (l0 + li)[None, :], y.to(Y.dtype.element_ty), mask=m2)
    tl.store(MEAN + bg, mean)
    tl.store(RSTD + bg, rstd)


@triton.jit
def _group_bwd(DY, X, MEAN, RSTD, SHIFT, SCALE, W, BIAS, DX, DSHIFT, DSCALE, DW_P, DB_P, C, L, G,
               sx_b, sx_c, sx_l, sd_b, sd_c, sd_l,
               ACT: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_W: tl.constexpr,
               HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """One program per (sample, group). Per channel c: s_g = sum_l gu, s_gx = sum_l gu * xhat give
    dshift, dscale and this sample's dweight / dbias partials (B, C); dx needs the group sums of
    dxhat and dxhat * xhat, so gu is recomputed in a second pass instead of kept."""
    bg = tl.program_id(0).to(tl.int64)
    b = bg // G
    cg = C // G
    c_first = (bg % G) * cg
    n = cg * L
    ci = tl.arange(0, BLOCK_C)
    li = tl.arange(0, BLOCK_L)
    mean = tl.load(MEAN + bg).to(ACC)
    rstd = tl.load(RSTD + bg).to(ACC)
    sum1 = tl.zeros([BLOCK_C], ACC)
    sum2 = tl.zeros([BLOCK_C], ACC)
    for c0 in range(0, cg, BLOCK_C):
        ch = c_first + c0 + ci
        chm = (c0 + ci) < cg
        if HAS_W:
            w = tl.load(W + ch, mask=chm, other=0.0).to(ACC)
        else:
            w = tl.full([BLOCK_C], 1.0, ACC)
        if HAS_BIAS:
            bias = tl.load(BIAS + ch, mask=chm, other=0.0).to(ACC)
        else:
            bias = tl.zeros([BLOCK_C], ACC)
        if HAS_SCALE:
            one_plus = 1.0 + tl.load(SCALE + b * C + ch, mask=chm, other=0.0).to(ACC)
        else:
            one_plus = tl.full([BLOCK_C], 1.0, ACC)
        if HAS_SHIFT:
            shift = tl.load(SHIFT + b * C + ch, mask=chm, other=0.0).to(ACC)
        else:
            shift = tl.zeros([BLOCK_C], ACC)
        s_g = tl.zeros([BLOCK_C], ACC)
        s_gx = tl.zeros([BLOCK_C], ACC)
        for l0 in range(0, L, BLOCK_L):
            m2 = chm[:, None] & ((l0 + li) < L)[None, :]
            x = tl.load(X + b * sx_b + ch[:, None] * sx_c + (l0 + li)[None, :] * sx_l, mask=m2, other=0.0).to(ACC)
            gu = tl.load(DY + b * sd_b + ch[:, None] * sd_c + (l0 + li)[None, :] * sd_l, mask=m2, other=0.0).to(ACC)
            xhat = tl.where(m2, (x - mean) * rstd, 0.0)
            if ACT != 0:
                gu = gu * act_grad((xhat * w[:, None] + bias[:, None]) * one_plus[:, None] + shift[:, None], ACT)
                gu = tl.where(m2, gu, 0.0)
            s_g += rsum(gu, axis=1)
            s_gx += rsum(gu * xhat, axis=1)
        if HAS_SHIFT:
            tl.store(DSHIFT + b * C + ch, s_g, mask=chm)
        if HAS_SCALE:
            tl.store(DSCALE + b * C + ch, w * s_gx + bias * s_g, mask=chm)
        if HAS_W:
            tl.store(DW_P + b * C + ch, one_plus * s_gx, mask=chm)
        if HAS_BIAS:
            tl.store(DB_P + b * C + ch, one_plus * s_g, mask=chm)
        sum1 += tl.where(chm, one_plus * w * s_g, 0.0)
        sum2 += tl.where(chm, one_plus * w * s_gx, 0.0)
    c1 = rsum(sum1, axis=0) / n
    c2 = rsum(sum2, axis=0) / n
    for c0 in range(0, cg, BLOCK_C):
        ch = c_first + c0 + ci
        chm = (c0 + ci) < cg
        if HAS_W:
            w = tl.load(W + ch, mask=chm, other=0.0).to(ACC)
        else:
            w = tl.full([BLOCK_C], 1.0, ACC)
        if HAS_BIAS:
            bias = tl.load(BIAS + ch, mask=chm, other=0.0).to(ACC)
        else:
            bias = tl.zeros([BLOCK_C], ACC)
        if HAS_SCALE:
            one_plus = 1.0 + tl.load(SCALE + b * C + ch, mask=chm, other=0.0).to(ACC)
        else:
            one_plus = tl.full([BLOCK_C], 1.0, ACC)
        if HAS_SHIFT:
            shift = tl.load(SHIFT + b * C + ch, mask=chm, other=0.0).to(ACC)
        else:
            shift = tl.zeros([BLOCK_C], ACC)
        k = one_plus * w
        for l0 in range(0, L, BLOCK_L):
            m2 = chm[:, None] & ((l0 + li) < L)[None, :]
            x = tl.load(X + b * sx_b + ch[:, None] * sx_c + (l0 + li)[None, :] * sx_l, mask=m2, other=0.0).to(ACC)
            gu = tl.load(DY + b * sd_b + ch[:, None] * sd_c + (l0 + li)[None, :] * sd_l, mask=m2, other=0.0).to(ACC)
            xhat = (x - mean) * rstd
            if ACT != 0:
                gu = gu * act_grad((xhat * w[:, None] + bias[:, None]) * one_plus[:, None] + shift[:, None], ACT)
            dx = rstd * (gu * k[:, None] - c1 - xhat * c2)
            tl.store(DX + (b * C + ch)[:, None] * L + (l0 + li)[None, :], dx.to(DX.dtype.element_ty), mask=m2)


@device_fn
def load_group_params(W, BIAS, SHIFT, SCALE, b, ch, chm, C, HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr,
                      HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    """(w, bias, 1 + scale, shift) of channels ``ch`` of samples ``b`` (any matching shapes)."""
    if HAS_W:
        w = tl.load(W + ch, mask=chm, other=0.0).to(ACC)
    else:
        w = tl.where(chm, 1.0, 0.0).to(ACC)
    if HAS_BIAS:
        bias = tl.load(BIAS + ch, mask=chm, other=0.0).to(ACC)
    else:
        bias = tl.zeros(chm.shape, ACC)
    if HAS_SCALE:
        one_plus = 1.0 + tl.load(SCALE + b * C + ch, mask=chm, other=0.0).to(ACC)
    else:
        one_plus = tl.where(chm, 1.0, 0.0).to(ACC) + tl.zeros(chm.shape, ACC)
    if HAS_SHIFT:
        shift = tl.load(SHIFT + b * C + ch, mask=chm, other=0.0).to(ACC)
    else:
        shift = tl.zeros(chm.shape, ACC)
    return w, bias, one_plus, shift


@triton.jit
def _group_fwd_whole(X, Y, SHIFT, SCALE, W, BIAS, MEAN, RSTD, BG, C, L, G, sx_b, sx_c, sx_l, eps,
                     ACT: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_W: tl.constexpr,
                     HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_L: tl.constexpr):
    """Groups that fit a tile: BLOCK_G whole (sample, group) pairs per program as a
    (group, channel, position) tile, x read once."""
    bg = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    cg = C // G
    b = (bg // G)[:, None]
    ci = tl.arange(0, BLOCK_C)[None, :]
    ch = (bg % G)[:, None] * cg + ci
    chm = (bg < BG)[:, None] & (ci < cg)
    li = tl.arange(0, BLOCK_L)[None, None, :]
    m3 = chm[:, :, None] & (li < L)
    x = tl.load(X + (b * sx_b + ch * sx_c)[:, :, None] + li * sx_l, mask=m3, other=0.0).to(ACC)
    n = cg * L
    mean = rsum(rsum(x, axis=2), axis=1) / n
    xc = tl.where(m3, x - mean[:, None, None], 0.0)
    rstd = inv_sqrt(rsum(rsum(xc * xc, axis=2), axis=1) / n + eps, ACC)
    w, bias, one_plus, shift = load_group_params(W, BIAS, SHIFT, SCALE, b, ch, chm, C, HAS_SHIFT, HAS_SCALE,
                                                 HAS_W, HAS_BIAS, ACC)
    a = (xc * rstd[:, None, None]) * w[:, :, None] + bias[:, :, None]
    y = act_fwd(a * one_plus[:, :, None] + shift[:, :, None], ACT)
    tl.store(Y + (b * C + ch)[:, :, None] * L + li, y.to(Y.dtype.element_ty), mask=m3)
    tl.store(MEAN + bg, mean, mask=bg < BG)
    tl.store(RSTD + bg, rstd, mask=bg < BG)


@triton.jit
def _group_bwd_whole(DY, X, MEAN, RSTD, SHIFT, SCALE, W, BIAS, DX, DSHIFT, DSCALE, DW_P, DB_P, BG, C, L, G,
                     sx_b, sx_c, sx_l, sd_b, sd_c, sd_l,
                     ACT: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_W: tl.constexpr,
                     HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_L: tl.constexpr):
    """The backward of :func:`_group_fwd_whole`, same tiles; per-channel sums over L give dshift,
    dscale and the (B, C) dweight / dbias partials, their group sums give dx."""
    bg = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    cg = C // G
    b = (bg // G)[:, None]
    ci = tl.arange(0, BLOCK_C)[None, :]
    ch = (bg % G)[:, None] * cg + ci
    chm = (bg < BG)[:, None] & (ci < cg)
    li = tl.arange(0, BLOCK_L)[None, None, :]
    m3 = chm[:, :, None] & (li < L)
    x = tl.load(X + (b * sx_b + ch * sx_c)[:, :, None] + li * sx_l, mask=m3, other=0.0).to(ACC)
    gu = tl.load(DY + (b * sd_b + ch * sd_c)[:, :, None] + li * sd_l, mask=m3, other=0.0).to(ACC)
    mean = tl.load(MEAN + bg, mask=bg < BG, other=0.0).to(ACC)
    rstd = tl.load(RSTD + bg, mask=bg < BG, other=0.0).to(ACC)
    w, bias, one_plus, shift = load_group_params(W, BIAS, SHIFT, SCALE, b, ch, chm, C, HAS_SHIFT, HAS_SCALE,
                                                 HAS_W, HAS_BIAS, ACC)
    xhat = tl.where(m3, (x - mean[:, None, None]) * rstd[:, None, None], 0.0)
    if ACT != 0:
        u = (xhat * w[:, :, None] + bias[:, :, None]) * one_plus[:, :, None] + shift[:, :, None]
        gu = tl.where(m3, gu * act_grad(u, ACT), 0.0)
    s_g = rsum(gu, axis=2)
    s_gx = rsum(gu * xhat, axis=2)
    mod = b * C + ch
    if HAS_SHIFT:
        tl.store(DSHIFT + mod, s_g, mask=chm)
    if HAS_SCALE:
        tl.store(DSCALE + mod, w * s_gx + bias * s_g, mask=chm)
    if HAS_W:
        tl.store(DW_P + mod, one_plus * s_gx, mask=chm)
    if HAS_BIAS:
        tl.store(DB_P + mod, one_plus * s_g, mask=chm)
    k = one_plus * w
    n = cg * L
    c1 = rsum(k * s_g, axis=1) / n
    c2 = rsum(k * s_gx, axis=1) / n
    dx = rstd[:, None, None] * (gu * k[:, :, None] - c1[:, None, None] - xhat * c2[:, None, None])
    tl.store(DX + mod[:, :, None] * L + li, dx.to(DX.dtype.element_ty), mask=m3)


def _group_tiles(B: int, G: int, cg: int, L: int, gpu_tile: int | None = None):
    """(whole, BLOCK_G, BLOCK_C, BLOCK_L): whole groups per tile when one fits, else one program
    per group looping over channel and position blocks. ``gpu_tile``: GPU_BWD_TILE unless given."""
    budget = norm_tile(gpu_tile)
    pc, pl = next_pow2(cg), next_pow2(L)
    if pc * pl <= budget:
        return True, max(1, min(next_pow2(B * G), budget // (pc * pl))), pc, pl
    block_l = min(pl, budget)
    return False, 1, max(1, min(pc, budget // block_l)), block_l


# ----------------------------------------------------------------------------- launches


def forward(x, shift, scale, weight, bias, eps: float, act: str | None, num_groups: int):
    """(y, mean, rstd): y in x's dtype, mean / rstd (B, G) in the accumulation dtype."""
    acc = acc_dtype(x)
    shift, scale, weight, bias = small(shift), small(scale), small(weight), small(bias)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    flags = has_flags(shift, scale, weight, bias)
    B, C, L = x.shape
    mean = torch.empty((B, num_groups), dtype=acc, device=x.device)
    rstd = torch.empty_like(mean)
    whole, block_g, block_c, block_l = _group_tiles(B, num_groups, C // num_groups, L, GPU_GROUP_TILE)
    with device_ctx(x):
        if whole:
            _group_fwd_whole[(cdiv(B * num_groups, block_g),)](
                x, y, shift, scale, weight, bias, mean, rstd, B * num_groups, C, L, num_groups, *x.stride(),
                eps, ACT=ACTS[act], ACC=tl_acc(acc), BLOCK_G=block_g, BLOCK_C=block_c, BLOCK_L=block_l,
                num_warps=warps_for(block_g * block_c * block_l, 32), **flags)
        else:
            _group_fwd[(B * num_groups,)](x, y, shift, scale, weight, bias, mean, rstd, C, L, num_groups,
                                          *x.stride(), eps, ACT=ACTS[act], ACC=tl_acc(acc), BLOCK_C=block_c,
                                          BLOCK_L=block_l, num_warps=warps_for(block_c * block_l, 32), **flags)
    return y, mean, rstd


def backward(dy, x, mean, rstd, shift, scale, weight, bias, act: str | None, num_groups: int):
    """(dx, dshift, dscale, dweight, dbias), each in its input's dtype; an empty tensor where the
    input was None."""
    acc = acc_dtype(x)
    shift, scale, weight, bias = small(shift), small(scale), small(weight), small(bias)
    mean, rstd = mean.to(acc).contiguous(), rstd.to(acc).contiguous()
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    flags = has_flags(shift, scale, weight, bias)
    new = lambda *shape: torch.empty(shape, dtype=acc, device=x.device)  # noqa: E731
    B, C, L = x.shape
    dshift = new(B, C) if shift is not None else None
    dscale = new(B, C) if scale is not None else None
    dw_p = new(B, C) if weight is not None else None
    db_p = new(B, C) if bias is not None else None
    whole, block_g, block_c, block_l = _group_tiles(B, num_groups, C // num_groups, L)
    with device_ctx(x):
        if whole:
            _group_bwd_whole[(cdiv(B * num_groups, block_g),)](
                dy, x, mean, rstd, shift, scale, weight, bias, dx, dshift, dscale, dw_p, db_p, B * num_groups,
                C, L, num_groups, *x.stride(), *dy.stride(), ACT=ACTS[act], ACC=tl_acc(acc), BLOCK_G=block_g,
                BLOCK_C=block_c, BLOCK_L=block_l,
                num_warps=warps_for(block_g * block_c * block_l, GROUP_BWD_PER_THREAD), **flags)
        else:
            _group_bwd[(B * num_groups,)](dy, x, mean, rstd, shift, scale, weight, bias, dx, dshift, dscale,
                                          dw_p, db_p, C, L, num_groups, *x.stride(), *dy.stride(),
                                          ACT=ACTS[act], ACC=tl_acc(acc), BLOCK_C=block_c, BLOCK_L=block_l,
                                          num_warps=warps_for(block_c * block_l, GROUP_BWD_PER_THREAD), **flags)
    return (dx, *finish_grads(x, dshift, dscale, dw_p, db_p, shift, scale, weight, bias, None))
