"""Block sizes for the elementwise / row-reduction kernels of this package.

On a GPU a program handles a few thousand elements (4 warps, enough in flight to saturate HBM on
memory-bound kernels). Under ``TRITON_INTERPRET=1`` every program is interpreted in Python, so
there a program takes as much as a large numpy array holds and the grid stays a handful of
programs: the tests then spend their time in numpy, not in the interpreter's per-program loop.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

GPU_TILE = 2048
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


def acc_dtype(*tensors) -> torch.dtype:
    """The accumulation dtype: float64 when any operand is float64, else fp32."""
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in tensors) else torch.float32


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
