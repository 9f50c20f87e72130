"""gated_residual and gated_residual_norm_modulate against naive float64 formulas."""
from __future__ import annotations

import pytest
import torch

from flowfm_fast.ops import gated_residual, gated_residual_norm_modulate, norm_modulate, use_backend
from naive import (LOW_PRECISION, assert_close, assert_float64_precision, backend_params,
                   d64, naive_gated_residual, naive_norm_modulate)

ACTS = [None, "silu", "gelu_tanh"]
SHAPES = [(1, 1), (3, 7), (123, 127), (1, 300), (3, 5, 7), (1, 123, 1), (3, 7, 300), (2, 123, 127)]


@pytest.fixture(params=backend_params("gated_residual"))
def backend(request):
    with use_backend(request.param):
        yield request.param


@pytest.fixture(params=backend_params("gated_residual_norm_modulate"))
def fused_backend(request):
    with use_backend(request.param):
        yield request.param


def make(shape, dtype=torch.float32, seed=0, h_dtype=None, gate_dtype=None):
    torch.manual_seed(seed)
    res = torch.randn(shape).to(dtype)
    h = torch.randn(shape).to(h_dtype or dtype)
    gate = torch.randn(shape[0], shape[-1]).to(gate_dtype or dtype)
    return res, h, gate


def make_mod(shape, seed=1, dtype=torch.float32):
    torch.manual_seed(seed)
    d = shape[-1]
    return ((0.5 * torch.randn(shape[0], d)).to(dtype), (0.5 * torch.randn(shape[0], d)).to(dtype),
            (1 + 0.3 * torch.randn(d)).to(dtype), (0.3 * torch.randn(d)).to(dtype))


# ----------------------------------------------------------------------------- gated_residual


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gated_residual_fp32(backend, shape):
    res, h, gate = make(shape)
    out = gated_residual(res, h, gate)
    assert out.dtype == torch.float32 and out.shape == res.shape
    assert_close(out, naive_gated_residual(res, h, gate), torch.float32)


def test_gated_residual_broadcast_by_hand(backend):
    """gate (B, D) is the same for every token t."""
    res, h, gate = make((2, 5, 3), seed=2)
    out = gated_residual(res, h, gate)
    for b in range(2):
        for t in range(5):
            for d in range(3):
                want = float(res[b, t, d]) + float(gate[b, d]) * float(h[b, t, d])
                assert abs(float(out[b, t, d]) - want) <= 1e-6 + 1e-6 * abs(want)


def test_gated_residual_zero_gate_is_identity(backend):
    res, h, _ = make((3, 7, 11), seed=3)
    out = gated_residual(res, h, torch.zeros(3, 11))
    assert torch.equal(out, res)
    assert out is not res


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", [(3, 7, 300), (123, 127)], ids=str)
def test_gated_residual_low_precision(backend, shape, dtype):
    res, h, gate = make(shape, dtype, seed=4)
    out = gated_residual(res, h, gate)
    assert out.dtype == dtype
    assert_close(out, naive_gated_residual(res, h, gate), dtype)


@pytest.mark.parametrize("res_dtype,other_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                   (torch.float16, torch.float32), (torch.float32, torch.float16)])
def test_gated_residual_keeps_res_dtype(backend, res_dtype, other_dtype):
    res, h, gate = make((3, 5, 7), res_dtype, seed=5, h_dtype=other_dtype, gate_dtype=other_dtype)
    out = gated_residual(res, h, gate)
    assert out.dtype == res_dtype
    assert_close(out, naive_gated_residual(res, h, gate), res_dtype)


def test_gated_residual_non_contiguous(backend):
    torch.manual_seed(6)
    res = torch.randn(3, 12, 7).transpose(1, 2)
    h = torch.randn(3, 7, 24)[:, :, ::2]
    gate = torch.randn(12, 3).t()
    assert not (res.is_contiguous() or h.is_contiguous() or gate.is_contiguous())
    out = gated_residual(res, h, gate)
    torch.testing.assert_close(out, gated_residual(res.contiguous(), h.contiguous(), gate.contiguous()),
                               rtol=0, atol=0)
    assert_close(out, naive_gated_residual(res, h, gate), torch.float32)


@pytest.mark.parametrize("shape", [(2, 3, 4), (3, 5)], ids=str)
def test_gated_residual_gradcheck_float64(backend, shape):
    inputs = tuple(d64(t, grad=True) for t in make(shape, seed=7))
    assert_float64_precision(gated_residual(*inputs), naive_gated_residual(*inputs))
    assert torch.autograd.gradcheck(gated_residual, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(3, 7, 127), (123, 7), (1, 1)], ids=str)
def test_gated_residual_fp32_grads(backend, shape):
    raw = make(shape, seed=8)
    ins32 = [t.clone().requires_grad_(True) for t in raw]
    ins64 = [d64(t, grad=True) for t in raw]
    g = torch.randn(shape)
    got = torch.autograd.grad(gated_residual(*ins32), ins32, g)
    want = torch.autograd.grad(naive_gated_residual(*ins64), ins64, g.double())
    for name, a, b in zip(("res", "h", "gate"), got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("args,exc,match", [
    (lambda r, h, g: (r[0, 0], h[0, 0], g), ValueError, "res must have 2 or 3"),
    (lambda r, h, g: (r[None], h[None], g), ValueError, "res must have 2 or 3"),
    (lambda r, h, g: (r, h[:, :2], g), ValueError, "h must have shape"),
    (lambda r, h, g: (r, h[0], g), ValueError, "h must have shape"),
    (lambda r, h, g: (r, h, g[:, :3]), ValueError, "gate must have shape"),
    (lambda r, h, g: (r, h, g[:1]), ValueError, "gate must have shape"),
    (lambda r, h, g: (r, h, g[:, None]), ValueError, "gate must have 2"),
    (lambda r, h, g: (r.long(), h, g), TypeError, "res must be float"),
    (lambda r, h, g: (r, h.int(), g), TypeError, "h must be float"),
    (lambda r, h, g: (r, h, g.to(torch.int8)), TypeError, "gate must be float"),
    (lambda r, h, g: (r, h.tolist(), g), TypeError, "h must be a torch.Tensor"),
    (lambda r, h, g: (r[:, :0], h[:, :0], g), ValueError, "res must not be empty"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_gated_residual_validation(args, exc, match):
    with pytest.raises(exc, match=match):
        gated_residual(*args(*make((2, 5, 7))))


# ----------------------------------------------------------------------------- fused chain


def naive_fused(res, h, gate, shift, scale, kind, weight, bias, eps, act):
    r = naive_gated_residual(res, h, gate)
    return r, naive_norm_modulate(r, shift, scale, kind, weight, bias, eps, act)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (123, 300), (3, 5, 127), (1, 123, 7), (3, 7, 300)], ids=str)
def test_fused_fp32(fused_backend, shape, kind, act):
    res, h, gate = make(shape, seed=9)
    shift, scale, w, b = make_mod(shape, seed=10)
    r, y = gated_residual_norm_modulate(res, h, gate, shift, scale, kind=kind, weight=w, bias=b, eps=1e-5, act=act)
    r64, y64 = naive_fused(res, h, gate, shift, scale, kind, w, b, 1e-5, act)
    assert r.dtype == y.dtype == torch.float32
    assert r.shape == y.shape == res.shape
    assert_close(r, r64, torch.float32)
    assert_close(y, y64, torch.float32)


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_fused_matches_unfused_chain(fused_backend, kind):
    res, h, gate = make((3, 11, 7), seed=11)
    shift, scale, w, b = make_mod((3, 11, 7), seed=12)
    r, y = gated_residual_norm_modulate(res, h, gate, shift, scale, kind=kind, weight=w, bias=b, act="silu")
    r2 = gated_residual(res, h, gate)
    y2 = norm_modulate(r2, shift, scale, kind=kind, weight=w, bias=b, act="silu")
    torch.testing.assert_close(r, r2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("modulate,affine", [(False, False), (True, False), (False, True)])
def test_fused_optional_none(fused_backend, modulate, affine):
    res, h, gate = make((2, 9, 13), seed=13)
    shift, scale, w, b = make_mod((2, 9, 13), seed=14)
    shift, scale = (shift, scale) if modulate else (None, None)
    w, b = (w, b) if affine else (None, None)
    r, y = gated_residual_norm_modulate(res, h, gate, shift, scale, kind="layer", weight=w, bias=b)
    r64, y64 = naive_fused(res, h, gate, shift, scale, "layer", w, b, 1e-6, None)
    assert_close(r, r64, torch.float32)
    assert_close(y, y64, torch.float32)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("kind,shape", [("layer", (3, 7, 127)), ("rms", (123, 300))], ids=str)
def test_fused_low_precision(fused_backend, kind, shape, dtype, act):
    res, h, gate = make(shape, dtype, seed=15)
    shift, scale, w, b = make_mod(shape, seed=16, dtype=dtype)
    r, y = gated_residual_norm_modulate(res, h, gate, shift, scale, kind=kind, weight=w, bias=b, act=act)
    assert r.dtype == y.dtype == dtype
    r64, y64 = naive_fused(res, h, gate, shift, scale, kind, w, b, 1e-6, act)
    assert_close(r, r64, dtype)
    # The norm may see r before or after rounding to res's dtype: allow twice the tolerance.
    assert_close(y, y64, dtype, scale=2.0)


def test_fused_non_contiguous(fused_backend):
    torch.manual_seed(17)
    res = torch.randn(3, 12, 7).transpose(1, 2)
    h = torch.randn(3, 7, 24)[:, :, ::2]
    gate, shift, scale = (torch.randn(12, 3).t() for _ in range(3))
    w, b = torch.randn(24)[::2], torch.randn(12, 2)[:, 0]
    r, y = gated_residual_norm_modulate(res, h, gate, shift, scale, kind="rms", weight=w, bias=b, act="gelu_tanh")
    rc, yc = gated_residual_norm_modulate(res.contiguous(), h.contiguous(), gate.contiguous(), shift.contiguous(),
                                          scale.contiguous(), kind="rms", weight=w.contiguous(),
                                          bias=b.contiguous(), act="gelu_tanh")
    torch.testing.assert_close(r, rc, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y, yc, rtol=1e-6, atol=1e-6)
    assert_close(y, naive_fused(res, h, gate, shift, scale, "rms", w, b, 1e-6, "gelu_tanh")[1], torch.float32)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("kind,shape", [("layer", (2, 3, 4)), ("rms", (3, 5))], ids=str)
def test_fused_gradcheck_float64(fused_backend, kind, shape, act):
    inputs = tuple(d64(t, grad=True) for t in make(shape, seed=18) + make_mod(shape, seed=19))

    def fn(res, h, gate, shift, scale, w, b):
        return gated_residual_norm_modulate(res, h, gate, shift, scale, kind=kind, weight=w, bias=b,
                                            eps=1e-5, act=act)

    got, want = fn(*inputs), naive_fused(*inputs[:5], kind, *inputs[5:], 1e-5, act)
    assert_float64_precision(got[0], want[0])
    assert_float64_precision(got[1], want[1])
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("kind,shape", [("layer", (3, 7, 127)), ("rms", (123, 7)), ("layer", (1, 1))], ids=str)
def test_fused_fp32_grads(fused_backend, kind, shape, act):
    raw = make(shape, seed=20) + make_mod(shape, seed=21)
    ins32 = [t.clone().requires_grad_(True) for t in raw]
    ins64 = [d64(t, grad=True) for t in raw]
    g1, g2 = torch.randn(shape), torch.randn(shape)
    r, y = gated_residual_norm_modulate(*ins32[:5], kind=kind, weight=ins32[5], bias=ins32[6], eps=1e-5, act=act)
    r64, y64 = naive_fused(*ins64[:5], kind, ins64[5], ins64[6], 1e-5, act)
    got = torch.autograd.grad((r, y), ins32, (g1, g2))
    want = torch.autograd.grad((r64, y64), ins64, (g1.double(), g2.double()))
    for name, a, b in zip(("res", "h", "gate", "shift", "scale", "weight", "bias"), got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("used", ["new_res", "y"])
def test_fused_grads_through_one_output(fused_backend, used):
    """Only one output reaches the loss (the other's gradient is absent, not zeros): the gradients
    are those of the float64 reference for that output alone."""
    shape = (3, 5, 16)
    raw = make(shape, seed=22) + make_mod(shape, seed=23)
    ins32 = [t.clone().requires_grad_(True) for t in raw]
    ins64 = [d64(t, grad=True) for t in raw]
    g = torch.randn(shape)
    out = gated_residual_norm_modulate(*ins32[:5], kind="layer", weight=ins32[5], bias=ins32[6], eps=1e-5)
    out64 = naive_fused(*ins64[:5], "layer", ins64[5], ins64[6], 1e-5, None)
    k = 0 if used == "new_res" else 1
    got = torch.autograd.grad(out[k], ins32, g, allow_unused=True)
    want = torch.autograd.grad(out64[k], ins64, g.double(), allow_unused=True)
    for name, a, b in zip(("res", "h", "gate", "shift", "scale", "weight", "bias"), got, want):
        if b is None or not b.abs().any():  # no path from this input to the used output
            assert a is None or not a.abs().any(), f"grad {name} should be zero"
            continue
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(kind="group"), ValueError, "kind"),
    (dict(kind="batch"), ValueError, "kind"),
    (dict(act="tanh"), ValueError, "act"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(shift=torch.zeros(2, 5)), ValueError, "shift must have shape"),
    (dict(scale=torch.zeros(2, 7, 1)), ValueError, "scale must have 2"),
    (dict(scale=torch.zeros(2, 7, dtype=torch.int32)), TypeError, "scale must be float"),
    (dict(weight=torch.ones(5)), ValueError, "weight must have shape"),
    (dict(bias=torch.ones(1, 7)), ValueError, "bias must have 1"),
    (dict(gate=torch.ones(2, 5)), ValueError, "gate must have shape"),
    (dict(h=torch.ones(2, 4, 7)), ValueError, "h must have shape"),
    (dict(res=torch.ones(7)), ValueError, "res must have 2 or 3"),
])
def test_fused_validation(kwargs, exc, match):
    res, h, gate = make((2, 5, 7))
    args = dict(res=res, h=h, gate=gate)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        gated_residual_norm_modulate(**args)
