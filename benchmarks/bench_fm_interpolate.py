"""fm_interpolate, the flow-matching path, on data windows (B, C=3, L=300), B = 256 and 1024:
forward only (x0 is noise and x1 data: nothing upstream trains). Bytes: reads x0, x1, t; writes
x_t, u_t.
"""
from __future__ import annotations

import pytest
import torch

from _common import impls, nbytes, run_op, shape_str
from flowfm_fast import ops

SHAPES = [(256, 3, 300), (1024, 3, 300)]
if torch.cuda.is_available():
    SHAPES += [(65536, 6, 300)]  # 450 MiB per tensor: bandwidth-bound on a GPU


def _inputs(device, B, C, L):
    g = torch.Generator(device).manual_seed(0)
    x0, x1, v = (torch.randn(B, C, L, device=device, generator=g) for _ in range(3))
    t = torch.rand(B, device=device, generator=g)
    return x0, x1, v, t


@pytest.mark.parametrize("impl", impls("fm_interpolate"))
@pytest.mark.parametrize("B,C,L", SHAPES)
def test_fm_interpolate(benchmark, device, impl, B, C, L):
    x0, x1, _, t = _inputs(device, B, C, L)
    run_op(benchmark, device, op="fm_interpolate", impl=impl, mode="fwd", case="fm_interpolate",
           shape=shape_str(B=B, C=C, L=L), fn=lambda x0, x1, t: ops.fm_interpolate(x0, x1, t, 0.0),
           inputs=dict(x0=x0, x1=x1, t=t), fwd_bytes=nbytes(x0, x1, t) + 2 * nbytes(x1))
