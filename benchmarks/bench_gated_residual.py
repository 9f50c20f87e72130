"""gated_residual ``res + gate * h`` and the fused chain gated_residual_norm_modulate (DiT's
residual update plus the next sub-layer's modulated LayerNorm), tokens (B, T, D), gate/shift/scale
(B, D), D = 128 (``small`` DiT width), 256 and 384 (``base``).

Bytes. gated_residual: fwd reads res, h, gate and writes the sum; the backward reads dy, h, gate
and writes dh, dgate (dres is dy itself). The chain: fwd reads res, h, gate, shift, scale and
writes new_res and y; the backward reads d(new_res), dy, new_res and h, re-reads gate/shift/scale
and writes dres, dh, dgate, dshift, dscale.
"""
from __future__ import annotations

import pytest
import torch

from _common import MODES, impls, nbytes, run_op, shape_str
from flowfm_fast import ops

TOKENS = [(256, 30, 128), (256, 30, 256), (256, 30, 384)]  # D: small DiT width, 256, base


def _inputs(device, B, T, D, n_mod):
    g = torch.Generator(device).manual_seed(0)
    res, h = (torch.randn(B, T, D, device=device, generator=g) for _ in range(2))
    mods = [0.1 * torch.randn(B, D, device=device, generator=g) for _ in range(n_mod)]
    return res, h, mods


@pytest.mark.parametrize("impl", impls("gated_residual"))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,T,D", TOKENS)
def test_gated_residual(benchmark, device, impl, mode, B, T, D):
    res, h, (gate,) = _inputs(device, B, T, D, 1)
    fwd = nbytes(res, h, gate) + nbytes(res)
    bwd = 3 * nbytes(res) + 2 * nbytes(gate)
    run_op(benchmark, device, op="gated_residual", impl=impl, mode=mode, case="gated_residual",
           shape=shape_str(B=B, T=T, D=D), fn=ops.gated_residual, inputs=dict(res=res, h=h, gate=gate),
           diff=("res", "h", "gate"), fwd_bytes=fwd, bwd_bytes=bwd)


@pytest.mark.parametrize("impl", impls("gated_residual_norm_modulate"))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,T,D", TOKENS)
def test_gated_residual_norm_modulate(benchmark, device, impl, mode, B, T, D):
    res, h, (gate, shift, scale) = _inputs(device, B, T, D, 3)
    fwd = nbytes(res, h, gate, shift, scale) + 2 * nbytes(res)
    bwd = 6 * nbytes(res) + 2 * nbytes(gate, shift, scale)
    run_op(benchmark, device, op="gated_residual_norm_modulate", impl=impl, mode=mode,
           case="gated_residual_norm_modulate layer", shape=shape_str(B=B, T=T, D=D),
           fn=lambda res, h, gate, shift, scale: ops.gated_residual_norm_modulate(res, h, gate, shift, scale, "layer",
                                                                                  eps=1e-6),
           inputs=dict(res=res, h=h, gate=gate, shift=shift, scale=scale),
           diff=("res", "h", "gate", "shift", "scale"), fwd_bytes=fwd, bwd_bytes=bwd)
