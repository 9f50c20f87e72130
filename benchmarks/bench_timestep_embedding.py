"""timestep_embedding: (N,) times -> (N, 256) sinusoidal features (the TimestepEmbedder's
freq_dim), N = 256 (a training batch) and 4096. Forward only: t is not trained.

Bytes: reads t, writes the features. The op is sin/cos-bound rather than memory-bound, so its
% of copy bandwidth says little; the ratios against eager and compile are the measure.
"""
from __future__ import annotations

import pytest
import torch

from _common import impls, nbytes, run_op, shape_str
from flowfm_fast import ops

OP = "timestep_embedding"
DIM = 256


@pytest.mark.parametrize("impl", impls(OP))
@pytest.mark.parametrize("N", [256, 4096])
def test_timestep_embedding(benchmark, device, impl, N):
    t = 1000.0 * torch.rand(N, device=device, generator=torch.Generator(device).manual_seed(0))
    run_op(benchmark, device, op=OP, impl=impl, mode="fwd", case=OP, shape=shape_str(N=N, dim=DIM),
           fn=lambda t: ops.timestep_embedding(t, DIM), inputs=dict(t=t),
           fwd_bytes=nbytes(t) + N * DIM * 4)
