"""linear_act ``act(x @ W.T + b)``: the DiT block's token GEMMs, x (B, T, K) with B = 256, T = 30:
the ``small`` MLP (128 -> 512 with GELU-tanh, 512 -> 128), ``small`` qkv (128 -> 384) and the
``base`` MLP's first layer (384 -> 1536, GELU-tanh).

A GEMM is bound by arithmetic, not by memory: these rows carry ``flops`` (2 M N K forward, twice
that more for the backward's dx and dW) and report.py prints GFLOP/s where the memory-bound ops
print GB/s; the copy-bandwidth part of the bar does not apply.
"""
from __future__ import annotations

import pytest
import torch

from _common import MODES, impls, run_op, shape_str
from flowfm_fast import ops

B, T = 256, 30
CASES = [(128, 512, "gelu_tanh"), (512, 128, None), (128, 384, None), (384, 1536, "gelu_tanh")]


@pytest.mark.parametrize("impl", impls("linear_act"))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("K,N,act", CASES)
def test_linear_act(benchmark, device, impl, mode, K, N, act):
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(B, T, K, device=device, generator=g)
    w = torch.randn(N, K, device=device, generator=g) / K ** 0.5
    b = 0.1 * torch.randn(N, device=device, generator=g)
    mnk = B * T * N * K
    run_op(benchmark, device, op="linear_act", impl=impl, mode=mode, case=f"linear_act {act or 'none'}",
           shape=shape_str(B=B, T=T, K=K, N=N), fn=lambda x, w, b: ops.linear_act(x, w, b, act),
           inputs=dict(x=x, w=w, b=b), diff=("x", "w", "b"), fwd_bytes=0, flops=2 * mnk, bwd_flops=4 * mnk)
