"""Block sizes for the elementwise / row-reduction kernels of this package.

On a GPU a program handles a few thousand elements (4 warps, enough in flight to saturate HBM on
memory-bound kernels). Under ``TRITON_INTERPRET=1`` every program is interpreted in Python, so
there a program takes as much as a large numpy array holds and the grid stays a handful of
programs: the tests then spend their time in numpy, not in the interpreter's per-program loop.
"""
from __future__ import annotations

import torch
import triton.language as tl

GPU_TILE = 2048
INTERPRETER_TILE = 1 << 16


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


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
