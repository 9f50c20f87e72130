"""Integrator updates of the samplers on windows (B, 3, 300), B = 64 .. 512: the in-place Euler
step ``x += dt * v`` and RK4's final combine ``x = x + dt * sum_i b_i k_i`` (4 stages, in place,
as FixedStepSolver calls it). Forward only (sampling runs without grad).

Bytes: Euler reads x, v and writes x; the combine reads x and the 4 stages and writes x.
"""
from __future__ import annotations

import pytest
import torch

from _common import impls, nbytes, run_op, shape_str
from flowfm_fast import ops

BATCHES = [64, 128, 256, 512]
C, L = 3, 300
DT = 1e-3
RK4_B = [1 / 6, 1 / 3, 1 / 3, 1 / 6]


@pytest.mark.parametrize("impl", impls("euler_step_"))
@pytest.mark.parametrize("B", BATCHES)
def test_euler_step(benchmark, device, impl, B):
    g = torch.Generator(device).manual_seed(0)
    x, v = (torch.randn(B, C, L, device=device, generator=g) for _ in range(2))
    run_op(benchmark, device, op="euler_step_", impl=impl, mode="fwd", case="euler_step_",
           shape=shape_str(B=B, C=C, L=L), fn=lambda x, v: ops.euler_step_(x, v, DT), inputs=dict(x=x, v=v),
           fwd_bytes=nbytes(x, v) + nbytes(x))


@pytest.mark.parametrize("impl", impls("rk_combine"))
@pytest.mark.parametrize("B", BATCHES)
def test_rk_combine(benchmark, device, impl, B):
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(B, C, L, device=device, generator=g)
    ks = [torch.randn(B, C, L, device=device, generator=g) for _ in RK4_B]
    run_op(benchmark, device, op="rk_combine", impl=impl, mode="fwd", case="rk_combine 4 stages",
           shape=shape_str(B=B, C=C, L=L), fn=lambda x, ks: ops.rk_combine(x, DT, ks, RK4_B, out=x),
           inputs=dict(x=x, ks=ks), fwd_bytes=nbytes(x, ks) + nbytes(x))
