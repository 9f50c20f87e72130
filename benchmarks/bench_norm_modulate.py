"""norm_modulate: ``act(norm(x) * (1 + scale) + shift)`` at the shapes of the models.

Tokens (DiT): x (B, T, D) with shift/scale (B, D), no norm affine; layer and rms, with and without
SiLU, D = 128 (``small`` DiT width), 256 and 384 (``base``), fp32, plus bf16 for layer at 256/384.
GroupNorm + SiLU (ResNet generator): x (B, C, L), weight/bias (C,), at the ``small`` (C=64,
8 groups) and ``base`` (C=128, 32 groups) widths.

Bytes: fwd reads x, shift, scale, weight, bias and writes y; the backward reads dy and x (the
statistics are recomputed or saved, O(rows)), reads the modulation/affine parameters again and
writes dx and their gradients.
"""
from __future__ import annotations

import pytest
import torch

from _common import MODES, impls, nbytes, run_op, shape_str
from flowfm_fast import ops

OP = "norm_modulate"
FP32 = [("layer", None), ("layer", "silu"), ("rms", None), ("rms", "silu")]
TOKEN_CASES = ([(256, 30, D, kind, act, torch.float32) for D in (128, 256, 384) for kind, act in FP32]
               + [(256, 30, D, "layer", None, torch.bfloat16) for D in (256, 384)])
GROUP_CASES = [(256, 64, 300, 8), (256, 128, 300, 32)]  # small, base: B, C, L, groups
if torch.cuda.is_available():
    # Large rows (x of 128-256 MiB, well past the 50-60 MB L2): the "80% of HBM bandwidth" goal is
    # judged here; the model shapes above are a few MB and launch-bound on a GPU.
    TOKEN_CASES += [(64, 1024, 1024, "layer", None, torch.float32), (64, 1024, 1024, "rms", "silu", torch.float32),
                    (64, 1024, 1024, "layer", None, torch.bfloat16)]
    GROUP_CASES += [(256, 128, 2048, 32)]


def _bytes(x, params):
    return nbytes(x, params) + nbytes(x), 3 * nbytes(x) + 2 * nbytes(params)


def _label(kind, act):
    return f"{OP} {kind}{'+' + act if act else ''}"


@pytest.mark.parametrize("impl", impls(OP))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,T,D,kind,act,dtype", TOKEN_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_norm_modulate_tokens(benchmark, device, impl, mode, kind, act, dtype, B, T, D):
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(B, T, D, device=device, generator=g).to(dtype)
    shift, scale = (0.1 * torch.randn(B, D, device=device, generator=g).to(dtype) for _ in range(2))
    fwd, bwd = _bytes(x, [shift, scale])
    run_op(benchmark, device, op=OP, impl=impl, mode=mode, case=_label(kind, act), shape=shape_str(B=B, T=T, D=D),
           fn=lambda x, shift, scale: ops.norm_modulate(x, shift, scale, kind, eps=1e-6, act=act),
           inputs=dict(x=x, shift=shift, scale=scale), diff=("x", "shift", "scale"), fwd_bytes=fwd, bwd_bytes=bwd)


@pytest.mark.parametrize("impl", impls(OP))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,C,L,groups", GROUP_CASES)
def test_norm_modulate_group(benchmark, device, impl, mode, B, C, L, groups):
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(B, C, L, device=device, generator=g)
    shift, scale = (0.1 * torch.randn(B, C, device=device, generator=g) for _ in range(2))
    weight = 1.0 + 0.1 * torch.randn(C, device=device, generator=g)
    bias = 0.1 * torch.randn(C, device=device, generator=g)
    fwd, bwd = _bytes(x, [shift, scale, weight, bias])
    run_op(benchmark, device, op=OP, impl=impl, mode=mode, case=_label(f"group{groups}", "silu"),
           shape=shape_str(B=B, C=C, L=L),
           fn=lambda x, shift, scale, weight, bias: ops.norm_modulate(x, shift, scale, "group", weight, bias, 1e-5,
                                                                      "silu", groups),
           inputs=dict(x=x, shift=shift, scale=scale, weight=weight, bias=bias),
           diff=("x", "shift", "scale", "weight", "bias"), fwd_bytes=fwd, bwd_bytes=bwd)
