"""Building blocks shared by the kernel modules of this package.

- Block sizes of the elementwise / row-reduction kernels (fm_interpolate, fm_loss, integrator_update,
  timestep_embedding), the accumulation dtype, and the float64 split of float kernel arguments.
- The norm family's blocks (norm_tokens, norm_group, gated_residual): device functions (activations,
  inverse square root, sums, affine / modulation loads), their tile, warp and partition sizing, the
  (B, T, D) view of token / row tensors, and the host-side finish of the partial-sum gradients.

On a GPU a program handles a few thousand elements (4 warps, enough in flight to saturate HBM on
memory-bound kernels). Under ``TRITON_INTERPRET=1`` every program is interpreted in Python, so
there a program takes as much as a large numpy array holds and the grid stays a handful of
programs: the tests then spend their time in numpy, not in the interpreter's per-program loop.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from .._backend import interpreting
# acc_dtype is defined once, beside the ops' fake kernels that must agree with it; kernels import it from here.
from ..ops._spec import acc_dtype  # noqa: F401

GPU_TILE = 2048
# Elements per program when interpreted, for every kernel of the package: the interpreter pays per
# program and per op, not per element, so it takes few, large tiles.
INTERPRETER_TILE = 1 << 16


# Host-side integer helpers. triton.cdiv / triton.next_power_of_2 became constexpr functions
# (Triton 3.9), ~5 us a call in Python: a backward launch's partition called them ~20 times.
def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tile_elems(device: torch.device) -> int:
    return INTERPRETER_TILE if device.type == "cpu" else GPU_TILE


def block_1d(n: int, device: torch.device) -> int:
    """One program's share of a flat array of ``n`` elements."""
    return min(next_pow2(n), tile_elems(device))


def tile_2d(rows: int, cols: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_COLS) for a rows x cols matrix: columns first (a whole row when it fits),
    then as many rows as fill the tile, so short rows (e.g. (123, 7)) still make full programs."""
    budget = tile_elems(device)
    bc = min(next_pow2(cols), budget)
    br = min(next_pow2(rows), max(1, budget // bc))
    return br, bc


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a (B, N) matrix whose rows are unit-stride: a view when its layout allows (any row
    stride, e.g. a batch slice), else a contiguous copy (transposed or strided samples)."""
    m = x.reshape(x.shape[0], -1)
    if m.shape[1] > 1 and m.stride(1) != 1:
        m = m.contiguous()
    return m


def tl_acc(dtype: torch.dtype):
    """``acc_dtype``'s value as the kernels' ``ACC`` constexpr."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def f64_split(x: float) -> tuple[float, float]:
    """``x`` as ``hi + lo``, each exact in fp32, for a float kernel argument. Triton may pass a
    Python float to the GPU as fp32 whatever its annotation (3.6 did: sigma_min = 0.3 lost ~1e-8 in
    the float64 path on an H200); the kernel adds the two halves in its accumulation dtype
    (``f64_join``), which keeps ~48 bits of ``x`` in float64 and gives fp32(x) in fp32."""
    hi = float(np.float32(x))
    lo = float(np.float32(x - hi)) if math.isfinite(hi) else 0.0
    return hi, lo


@triton.jit
def f64_join(hi, lo, ACC: tl.constexpr):
    return tl.full([1], hi, ACC) + tl.full([1], lo, ACC)


# ============================================================================ the norm family
# Shared by norm_tokens (layer / rms), norm_group (GroupNorm) and gated_residual (the fused chain).

ACTS = {None: 0, "none": 0, "silu": 1, "gelu_tanh": 2}

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

# Elements per tile of the norm family on a GPU (interpreted: INTERPRETER_TILE above). The
# backward tiles (token partition, GroupNorm backward) take ~4K elements (fp32: 16 KiB of registers
# per program).
GPU_BWD_TILE = 4096
# Forward tiles, from a launch sweep on an H200 (benchmarks/gpu_tune_norm.py, results in
# benchmarks/results/h200/): token rows in tiles of ~1K elements with 16 values per thread ran at
# 95% of the copy bandwidth in fp32 (4K elements, 4 warps: 79%). (The group forward's tile is
# norm_group.GPU_GROUP_TILE.)
GPU_ROW_TILE = 1024
# Programs a token backward launch aims for: 8 per SM on a GPU (132 SMs on an H100/H200), a
# handful when interpreted. Backward sweep on an H200 (GPU time from CUDA-graph replays,
# benchmarks/results/h200/): at 64x1024x1024, 4096-element tiles with 32 values per thread and
# 8 programs per SM ran fwd+bwd at 90% of the copy bandwidth in fp32 (349 us; 4 per SM: 512 us) and
# 81% in bf16. (The group backward's values per thread: norm_group.GROUP_BWD_PER_THREAD.)
INTERPRETER_PROGRAMS = 4
GPU_PROGRAMS = 8 * 132
# Token backwards up to this many elements keep one chunk per sample: their GPU time is a few
# microseconds, while each partial-sum reduction is one more launch (~10-30 us of host time each
# on the H200 machine, benchmarks/results/h200/host.log).
GPU_SMALL_ELEMS = 1 << 20


# ----------------------------------------------------------------------------- device functions


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


@device_fn
def sum01(v):
    return rsum(rsum(v, axis=1), axis=0)


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


# ----------------------------------------------------------------------------- launch sizing


def norm_tile(gpu_tile: int | None = None) -> int:
    """Elements per tile: ``gpu_tile`` (GPU_BWD_TILE unless given) on a GPU, INTERPRETER_TILE interpreted."""
    return INTERPRETER_TILE if interpreting() else (GPU_BWD_TILE if gpu_tile is None else gpu_tile)


def num_warps(elements: int) -> int:
    """Warps of a token-backward tile (the interpreter ignores it): 4 up to 4K elements, i.e. 32
    values per thread at GPU_BWD_TILE, which the H200 sweep found best (see GPU_PROGRAMS)."""
    return 4 if elements <= 4096 else 8 if elements <= 16384 else 16


def warps_for(elements: int, per_thread: int = 16) -> int:
    """Warps of a tile with ``per_thread`` values per thread, 1 to 16 warps (the forward tiles, see
    GPU_ROW_TILE, and the group backward, norm_group.GROUP_BWD_PER_THREAD)."""
    return max(1, min(16, next_pow2(max(1, elements // (32 * per_thread)))))


def row_tiles(R: int, D: int):
    """(BLOCK_R, BLOCK_D) of a forward row tile: a whole row (D up to the tile) per tile row."""
    block_d = next_pow2(D)
    budget = norm_tile(GPU_ROW_TILE)
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
    budget = max(1, norm_tile() // block_d)
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


# ----------------------------------------------------------------------------- host-side helpers


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


def small(t: torch.Tensor | None):
    """A small operand (modulation, affine, gate) made contiguous; None stays None."""
    return None if t is None else t.contiguous()


def has_flags(shift, scale, weight, bias):
    """The HAS_* constexprs of the optional modulation / affine tensors."""
    return dict(HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None, HAS_W=weight is not None,
                HAS_BIAS=bias is not None)


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
