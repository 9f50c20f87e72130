"""fm_loss on data windows (B, C=3, L=300), B = 256 and 1024, timed fwd and fwd+bwd with the
gradient w.r.t. the predicted velocity v. Bytes: fwd reads v, x0, x1 (the output is a scalar); the
backward re-reads v, x0, x1 and writes dv (u_t is never materialised, as the op's contract says).
"""
from __future__ import annotations

import pytest
import torch

from _common import MODES, impls, nbytes, run_op, shape_str
from flowfm_fast import ops

SHAPES = [(256, 3, 300), (1024, 3, 300)]
if torch.cuda.is_available():
    SHAPES += [(65536, 6, 300)]  # 450 MiB per tensor: bandwidth-bound on a GPU


def _inputs(device, B, C, L):
    g = torch.Generator(device).manual_seed(0)
    x0, x1, v = (torch.randn(B, C, L, device=device, generator=g) for _ in range(3))
    t = torch.rand(B, device=device, generator=g)
    return x0, x1, v, t


@pytest.mark.parametrize("impl", impls("fm_loss"))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,C,L", SHAPES)
def test_fm_loss(benchmark, device, impl, mode, B, C, L):
    x0, x1, v, t = _inputs(device, B, C, L)
    run_op(benchmark, device, op="fm_loss", impl=impl, mode=mode, case="fm_loss", shape=shape_str(B=B, C=C, L=L),
           fn=lambda v, x0, x1, t: ops.fm_loss(v, x0, x1, t, None, 0.0), inputs=dict(v=v, x0=x0, x1=x1, t=t),
           diff=("v",), fwd_bytes=nbytes(v, x0, x1), bwd_bytes=nbytes(v, x0, x1) + nbytes(v))
