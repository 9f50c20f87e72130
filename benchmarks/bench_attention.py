"""attention ``softmax(q k^T / sqrt(hd)) v`` at the DiT's sizes: q, k, v (B, H, T, hd) as permuted views
of one fused qkv projection (B, T, 3, H, hd), T = 30 tokens; ``small`` (H = 4, hd = 32) at the
training batch 64 and at 256, ``base`` (H = 6, hd = 64) at 256.

FLOPs: 4 B H T^2 hd forward (two GEMMs), twice that more for the backward (four): a compute-bound
row (GFLOP/s), although at T = 30 per-head overheads, not arithmetic, set the time.
"""
from __future__ import annotations

import pytest
import torch

from _common import MODES, impls, run_op, shape_str
from flowfm_fast import ops

CASES = [(64, 4, 30, 32), (256, 4, 30, 32), (256, 6, 30, 64)]


@pytest.mark.parametrize("impl", impls("attention"))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,H,T,hd", CASES)
def test_attention(benchmark, device, impl, mode, B, H, T, hd):
    g = torch.Generator(device).manual_seed(0)
    qkv = torch.randn(B, T, 3, H, hd, device=device, generator=g)
    flops = 4 * B * H * T * T * hd
    run_op(benchmark, device, op="attention", impl=impl, mode=mode, case="attention",
           shape=shape_str(B=B, H=H, T=T, hd=hd), fn=lambda qkv: ops.attention(*qkv.permute(2, 0, 3, 1, 4)),
           inputs=dict(qkv=qkv), diff=("qkv",), fwd_bytes=0, flops=flops, bwd_flops=2 * flops)
