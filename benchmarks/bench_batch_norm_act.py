"""batch_norm_act ``relu(batch_norm(x))`` in training mode (batch statistics, running update): the
encoder's activations (B, C, L) = (64, 32, 300), (64, 64, 150), (64, 128, 75) of the ``small``
config at the training batch, and (256, 64, 300) of ``base`` at B = 256.

Bytes. fwd reads x twice (statistics, then the normalisation; the second read is from cache only
when x fits) and writes y: 2 x + y counted, as the unavoidable traffic of a two-pass norm whose
input outgrows the cache. The backward reads x and dy for the channel sums, again for dx, and
writes dx: 4 reads + 1 write.
"""
from __future__ import annotations

import pytest
import torch

from _common import MODES, impls, nbytes, run_op, shape_str
from flowfm_fast import ops

CASES = [(64, 32, 300), (64, 64, 150), (64, 128, 75), (256, 64, 300)]


@pytest.mark.parametrize("impl", impls("batch_norm_act"))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,C,L", CASES)
def test_batch_norm_act(benchmark, device, impl, mode, B, C, L):
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(B, C, L, device=device, generator=g)
    w = 1 + 0.1 * torch.randn(C, device=device, generator=g)
    b = 0.1 * torch.randn(C, device=device, generator=g)
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    run_op(benchmark, device, op="batch_norm_act", impl=impl, mode=mode, case="batch_norm_act relu train",
           shape=shape_str(B=B, C=C, L=L),
           fn=lambda x, w, b: ops.batch_norm_act(x, rm, rv, w, b, True, 0.1, 1e-5, "relu"),
           inputs=dict(x=x, w=w, b=b), diff=("x", "w", "b"), fwd_bytes=3 * nbytes(x), bwd_bytes=5 * nbytes(x))
