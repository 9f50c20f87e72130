"""Triton kernels of ``norm_modulate``: ``y = act(norm(x) * (1 + scale) + shift)``.

Token kinds (``layer`` / ``rms``), x viewed as R rows of D features (tokens (B, T, D): R = B * T,
row r belongs to sample r // T; rows (N, D): T = 1)::

    xhat = (x - mean) * rstd            (rms: mean = 0)
    a    = xhat * w + bias              (the norm's own affine; ones / zeros when absent)
    u    = a * (1 + scale[b]) + shift[b]
    y    = act(u)

GroupNorm (``group``): x (B, C, L), statistics over each of G groups of C / G channels times L,
modulation (B, C) broadcast over L; same formula per element with w, bias, shift, scale per channel.

Layouts: x and dy are read through their strides (any (B, T, D) / (N, D) / (B, C, L) view, no copy);
y and dx are written contiguous; shift / scale / weight / bias are small and made contiguous. Each
tensor is loaded in its own dtype and converted in registers to the accumulation dtype (fp32, or
fp64 for fp64 x), so modulation may be of another dtype than x; mean / rstd are stored in it.

Backward, without atomics: dx needs only its own row (group). The parameter gradients are sums
over rows. Token kinds: program (p, c) of :func:`row_partition` owns a block of samples and a
chunk of their tokens, walks them in (samples, tokens, features) tiles, and writes its sums to
its own slots: dshift / dscale as (B, nchunk, D) partials, dweight / dbias as (programs, D)
partials. GroupNorm: one program per (sample, group) or per block of whole groups writes dshift /
dscale directly and dweight / dbias as (B, C) partials. A second, fixed-order ``sum`` over the
partials axis finishes them. The partition depends only on the shape and on the device kind (GPU
or the interpreter), so gradients are deterministic run to run.

Contract: fp32 within 1e-5 relative of the float64 formula (the tests hold it to 1e-5 forward,
1e-4 for gradients after the reductions); bf16 / fp16 within the Liger-style tolerances
(2e-2 / 2e-3). fp64 inputs are computed in fp64. Bit-exact: two runs with the same shapes on the
same device kind, forward and backward (no atomics, fixed partition). Close, not bit-exact,
versus the reference, the C++ backend, or the same rows under another shape (summation orders
follow the tiles).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._blocks import cdiv, next_pow2

ACTS = {None: 0, "none": 0, "silu": 1, "gelu_tanh": 2}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Device helpers are @triton.jit functions, inlined by the compiler. The interpreter instead
# re-patches triton.language on every call of a jit function (~1.5 ms each, most of a small
# kernel's time), and its kernels run as Python anyway, so there the helpers stay plain functions.
device_fn = (lambda fn: fn) if interpreting() else triton.jit

if interpreting() and hasattr(tl.standard, "_sum_combine"):
    def rsum(x, axis):
        # tl.sum is itself a jit function (the re-patching cost again); the interpreter's reduce
        # recognises sum's combine function and runs np.sum.
        return tl.reduce(x, axis, tl.standard._sum_combine)
else:
    @triton.jit
    def rsum(x, axis: tl.constexpr):
        return tl.sum(x, axis=axis)

# Elements per tile. The interpreter pays per program and per op, not per element, so it takes
# few, large tiles; a GPU takes ~4K elements (fp32: 16 KiB of registers per program).
INTERPRETER_TILE = 1 << 16
GPU_TILE = 4096
# Forward tiles, from a launch sweep on an H200 (benchmarks/gpu_tune_norm.py, results in
# benchmarks/results/h200/): token rows in tiles of ~1K elements with 16 values per thread ran at
# 95% of the copy bandwidth in fp32 (4K elements, 4 warps: 79%); a group of up to 8K elements held
# whole by one program, so x is read once, at 93% (looping over blocks of the group: 62%).
GPU_ROW_TILE = 1024
GPU_GROUP_TILE = 8192
# Programs a token backward launch aims for: 8 per SM on a GPU (132 SMs on an H100/H200), a
# handful when interpreted. Backward sweep on an H200 (GPU time from CUDA-graph replays,
# benchmarks/results/h200/): at 64x1024x1024, 4096-element tiles with 32 values per thread and
# 8 programs per SM ran fwd+bwd at 90% of the copy bandwidth in fp32 (349 us; 4 per SM: 512 us) and
# 81% in bf16. The group backward did best with 16 values per thread (423 us against 611 us at 32).
INTERPRETER_PROGRAMS = 4
GPU_PROGRAMS = 8 * 132
GROUP_BWD_PER_THREAD = 16
# Token backwards up to this many elements keep one chunk per sample: their GPU time is a few
# microseconds, while each partial-sum reduction is one more launch (~10-30 us of host time each
# on the H200 machine, benchmarks/results/h200/host.log).
GPU_SMALL_ELEMS = 1 << 20


# ----------------------------------------------------------------------------- shared helpers


@device_fn
def _tanh_gelu_inner(u):
    # tanh(z) = 1 - 2 / (exp(2z) + 1); |z| is clamped at 40, where tanh is +-1 even in float64,
    # so exp never overflows.
    z = 0.7978845608028654 * (u + 0.044715 * u * u * u)
    z = tl.minimum(tl.maximum(z, -40.0), 40.0)
    return 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)


@device_fn
def act_fwd(u, ACT: tl.constexpr):
    """act(u): 0 identity, 1 SiLU, 2 tanh-GELU (tanh written with exp: no libdevice)."""
    if ACT == 1:
        return u / (1.0 + tl.exp(tl.minimum(-u, 80.0)))
    elif ACT == 2:
        return 0.5 * u * (1.0 + _tanh_gelu_inner(u))
    else:
        return u


@device_fn
def act_grad(u, ACT: tl.constexpr):
    """d act / du at u."""
    if ACT == 1:
        s = 1.0 / (1.0 + tl.exp(tl.minimum(-u, 80.0)))
        return s * (1.0 + u * (1.0 - s))
    elif ACT == 2:
        th = _tanh_gelu_inner(u)
        return 0.5 * (1.0 + th) + 0.5 * u * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * u * u)
    else:
        return tl.full(u.shape, 1.0, u.dtype)


@device_fn
def inv_sqrt(v, ACC: tl.constexpr):
    # tl.rsqrt for fp32 (one instruction); fp64 takes the correctly rounded sqrt, as rsqrt.approx.f64
    # would not keep the float64 contract.
    if ACC == tl.float64:
        return 1.0 / tl.sqrt(v)
    else:
        return tl.rsqrt(v)


def _tile(gpu_tile: int | None = None) -> int:
    """Elements per tile: ``gpu_tile`` (GPU_TILE unless given) on a GPU, INTERPRETER_TILE interpreted."""
    return INTERPRETER_TILE if interpreting() else (GPU_TILE if gpu_tile is None else gpu_tile)


def num_warps(elements: int) -> int:
    """Warps of a token-backward tile (the interpreter ignores it): 4 up to 4K elements, i.e. 32
    values per thread at GPU_TILE, which the H200 sweep found best (see GPU_PROGRAMS)."""
    return 4 if elements <= 4096 else 8 if elements <= 16384 else 16


def warps_for(elements: int, per_thread: int = 16) -> int:
    """Warps of a tile with ``per_thread`` values per thread, 1 to 16 warps (the forward tiles, see
    GPU_ROW_TILE, and the group backward, GROUP_BWD_PER_THREAD)."""
    return max(1, min(16, next_pow2(max(1, elements // (32 * per_thread)))))


def acc_dtype(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def device_ctx(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else _NULL


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NULL = _Null()


def row_strides(t: torch.Tensor):
    """(sample, token, feature) strides of a (B, T, D) or (N, D) tensor (rows: T = 1)."""
    if t.dim() == 3:
        return t.stride(0), t.stride(1), t.stride(2)
    return t.stride(0), 0, t.stride(1)


def row_dims(t: torch.Tensor):
    """(B, T, D); rows (N, D) are N samples of one token."""
    return (t.shape[0], t.shape[1], t.shape[2]) if t.dim() == 3 else (t.shape[0], 1, t.shape[1])


def _small(t: torch.Tensor | None):
    return None if t is None else t.contiguous()


def row_tiles(R: int, D: int):
    """(BLOCK_R, BLOCK_D) of a forward row tile: a whole row (D up to the tile) per tile row."""
    block_d = next_pow2(D)
    budget = _tile(GPU_ROW_TILE)
    block_r = max(1, min(next_pow2(R), budget // block_d))
    return block_r, block_d


class Partition(NamedTuple):
    """How a token backward splits (B, T, D) into programs: a (BLOCK_B, BLOCK_T, BLOCK_D) tile of
    (samples, tokens, features); program (p, c) owns samples [p * bchunk, (p + 1) * bchunk) and
    tokens [c * chunk, (c + 1) * chunk), looping over them tile by tile."""
    block_b: int
    block_t: int
    block_d: int
    nbp: int
    bchunk: int
    nchunk: int
    chunk: int


def row_partition(B: int, T: int, D: int) -> Partition:
    """Depends only on the shape and the device kind, so the reductions are deterministic.
    Per-sample sums (dshift, dscale, dgate) come out as (B, nchunk, D) partials, per-feature sums
    (dweight, dbias) as (nbp * nchunk, D) partials; rows (N, D) are N samples of one token."""
    block_d = next_pow2(D)
    budget = max(1, _tile() // block_d)
    block_t = min(next_pow2(T), budget)
    block_b = max(1, min(next_pow2(B), budget // block_t))
    target = INTERPRETER_PROGRAMS if interpreting() else GPU_PROGRAMS
    nchunk = max(1, min(cdiv(T, block_t), cdiv(target, cdiv(B, block_b))))
    if not interpreting() and B * T * D <= GPU_SMALL_ELEMS:
        nchunk = 1  # small: host time rules, and one chunk per sample needs no second reduction
    chunk = cdiv(cdiv(T, nchunk), block_t) * block_t
    nchunk = cdiv(T, chunk)
    nbp = max(1, min(cdiv(B, block_b), cdiv(target, nchunk)))
    bchunk = cdiv(cdiv(B, nbp), block_b) * block_b
    nbp = cdiv(B, bchunk)
    return Partition(block_b, block_t, block_d, nbp, bchunk, nchunk, chunk)


# ----------------------------------------------------------------------------- token kinds


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


@device_fn
def load_affine(W, BIAS, cols, cm, HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    """The norm's weight and bias at feature offsets ``cols`` (any shape); ones / zeros when absent."""
    if HAS_W:
        w = tl.load(W + cols, mask=cm, other=0.0).to(ACC)
    else:
        w = tl.full(cm.shape, 1.0, ACC)
    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=cm, other=0.0).to(ACC)
    else:
        bias = tl.zeros(cm.shape, ACC)
    return w, bias


@device_fn
def load_mod(SHIFT, SCALE, mod_off, mm, HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr, ACC: tl.constexpr):
    """shift and scale at offsets ``mod_off`` (sample * D + feature); zeros when absent."""
    if HAS_SHIFT:
        shift = tl.load(SHIFT + mod_off, mask=mm, other=0.0).to(ACC)
    else:
        shift = tl.zeros(mm.shape, ACC)
    if HAS_SCALE:
        scale = tl.load(SCALE + mod_off, mask=mm, other=0.0).to(ACC)
    else:
        scale = tl.zeros(mm.shape, ACC)
    return shift, scale


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


@device_fn
def sum01(v):
    return rsum(rsum(v, axis=1), axis=0)


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


# ----------------------------------------------------------------------------- GroupNorm


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
    per group looping over channel and position blocks. ``gpu_tile``: GPU_TILE unless given."""
    budget = _tile(gpu_tile)
    pc, pl = next_pow2(cg), next_pow2(L)
    if pc * pl <= budget:
        return True, max(1, min(next_pow2(B * G), budget // (pc * pl))), pc, pl
    block_l = min(pl, budget)
    return False, 1, max(1, min(pc, budget // block_l)), block_l


# ----------------------------------------------------------------------------- launches


def _flags(shift, scale, weight, bias):
    return dict(HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None, HAS_W=weight is not None,
                HAS_BIAS=bias is not None)


def forward(x, shift, scale, weight, bias, kind: str, eps: float, act: str | None, num_groups: int):
    """(y, mean, rstd): y in x's dtype, mean / rstd in the accumulation dtype, (R,) or (B, G)."""
    tl_acc, acc = acc_dtype(x.dtype)
    shift, scale, weight, bias = _small(shift), _small(scale), _small(weight), _small(bias)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    flags = _flags(shift, scale, weight, bias)
    with device_ctx(x):
        if kind == "group":
            B, C, L = x.shape
            mean = torch.empty((B, num_groups), dtype=acc, device=x.device)
            rstd = torch.empty_like(mean)
            whole, block_g, block_c, block_l = _group_tiles(B, num_groups, C // num_groups, L, GPU_GROUP_TILE)
            if whole:
                _group_fwd_whole[(cdiv(B * num_groups, block_g),)](
                    x, y, shift, scale, weight, bias, mean, rstd, B * num_groups, C, L, num_groups, *x.stride(),
                    eps, ACT=ACTS[act], ACC=tl_acc, BLOCK_G=block_g, BLOCK_C=block_c, BLOCK_L=block_l,
                    num_warps=warps_for(block_g * block_c * block_l, 32), **flags)
            else:
                _group_fwd[(B * num_groups,)](x, y, shift, scale, weight, bias, mean, rstd, C, L, num_groups,
                                              *x.stride(), eps, ACT=ACTS[act], ACC=tl_acc, BLOCK_C=block_c,
                                              BLOCK_L=block_l, num_warps=warps_for(block_c * block_l, 32), **flags)
        else:
            B, T, D = row_dims(x)
            R = B * T
            mean = torch.empty((R,), dtype=acc, device=x.device)
            rstd = torch.empty_like(mean)
            block_r, block_d = row_tiles(R, D)
            _token_fwd[(cdiv(R, block_r),)](x, y, shift, scale, weight, bias, mean, rstd, R, T, D,
                                                   *row_strides(x), eps, RMS=kind == "rms", ACT=ACTS[act],
                                                   ACC=tl_acc, BLOCK_R=block_r, BLOCK_D=block_d,
                                                   num_warps=warps_for(block_r * block_d), **flags)
    return y, mean, rstd


def sum_partials(g: torch.Tensor, dim: int) -> torch.Tensor:
    """The fixed-order sum over a partials dimension; a view when there is one partial (no launch)."""
    return g.squeeze(dim) if g.shape[dim] == 1 else g.sum(dim)


def finish_grads(like_x, dshift, dscale, dw_p, db_p, shift, scale, weight, bias, mod_sum_dim):
    """The second, fixed-order reduction over the partials, cast to each input's dtype; an empty
    tensor (a fresh one each: custom-op outputs must not alias) stands for absent inputs."""
    def out(g, like, reduce):
        if like is None:
            return like_x.new_empty((0,))
        return (reduce(g) if reduce else g).to(like.dtype).reshape(like.shape)

    mod = (lambda g: sum_partials(g, mod_sum_dim)) if mod_sum_dim is not None else None
    feat = lambda g: sum_partials(g.reshape(-1, g.shape[-1]), 0)  # noqa: E731
    return (out(dshift, shift, mod), out(dscale, scale, mod), out(dw_p, weight, feat), out(db_p, bias, feat))


def backward(dy, x, mean, rstd, shift, scale, weight, bias, kind: str, act: str | None, num_groups: int):
    """(dx, dshift, dscale, dweight, dbias), each in its input's dtype; an empty tensor where the
    input was None."""
    tl_acc, acc = acc_dtype(x.dtype)
    shift, scale, weight, bias = _small(shift), _small(scale), _small(weight), _small(bias)
    mean, rstd = mean.to(acc).contiguous(), rstd.to(acc).contiguous()
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    flags = _flags(shift, scale, weight, bias)
    new = lambda *shape: torch.empty(shape, dtype=acc, device=x.device)  # noqa: E731
    with device_ctx(x):
        if kind == "group":
            B, C, L = x.shape
            dshift = new(B, C) if shift is not None else None
            dscale = new(B, C) if scale is not None else None
            dw_p = new(B, C) if weight is not None else None
            db_p = new(B, C) if bias is not None else None
            whole, block_g, block_c, block_l = _group_tiles(B, num_groups, C // num_groups, L)
            if whole:
                _group_bwd_whole[(cdiv(B * num_groups, block_g),)](
                    dy, x, mean, rstd, shift, scale, weight, bias, dx, dshift, dscale, dw_p, db_p, B * num_groups,
                    C, L, num_groups, *x.stride(), *dy.stride(), ACT=ACTS[act], ACC=tl_acc, BLOCK_G=block_g,
                    BLOCK_C=block_c, BLOCK_L=block_l,
                    num_warps=warps_for(block_g * block_c * block_l, GROUP_BWD_PER_THREAD), **flags)
            else:
                _group_bwd[(B * num_groups,)](dy, x, mean, rstd, shift, scale, weight, bias, dx, dshift, dscale,
                                              dw_p, db_p, C, L, num_groups, *x.stride(), *dy.stride(),
                                              ACT=ACTS[act], ACC=tl_acc, BLOCK_C=block_c, BLOCK_L=block_l,
                                              num_warps=warps_for(block_c * block_l, GROUP_BWD_PER_THREAD), **flags)
            mod_sum_dim = None
        else:
            B, T, D = row_dims(x)
            P = row_partition(B, T, D)
            dshift = new(B, P.nchunk, D) if shift is not None else None
            dscale = new(B, P.nchunk, D) if scale is not None else None
            dw_p = new(P.nbp * P.nchunk, D) if weight is not None else None
            db_p = new(P.nbp * P.nchunk, D) if bias is not None else None
            _token_bwd[(P.nbp, P.nchunk)](dy, x, mean, rstd, shift, scale, weight, bias, dx, dshift, dscale, dw_p,
                                          db_p, B, T, D, P.bchunk, P.chunk, P.nchunk, *row_strides(x),
                                          *row_strides(dy), RMS=kind == "rms", ACT=ACTS[act], ACC=tl_acc,
                                          BLOCK_B=P.block_b, BLOCK_T=P.block_t, BLOCK_D=P.block_d,
                                          num_warps=num_warps(P.block_b * P.block_t * P.block_d), **flags)
            mod_sum_dim = 1
    return (dx, *finish_grads(x, dshift, dscale, dw_p, db_p, shift, scale, weight, bias, mod_sum_dim))
