"""fm_interpolate against x_t = (1 - (1 - s) t) x0 + t x1, u_t = x1 - (1 - s) x0 in float64."""
from __future__ import annotations

import math

import pytest
import torch

from flowfm_fast.ops import fm_interpolate, use_backend
from naive import (LOW_PRECISION, assert_close, assert_float64_precision, backend_params, d64,
                   naive_fm_path)

OP = "fm_interpolate"
SHAPES = [(1, 1), (3, 7), (1, 3, 300), (3, 1, 127), (123, 3, 7), (3, 2, 5, 7)]
SIGMAS = [0.0, 0.1, 0.999]


@pytest.fixture(params=backend_params(OP))
def backend(request):
    with use_backend(request.param):
        yield request.param


def make(shape, dtype=torch.float32, seed=0, t_dtype=torch.float32):
    torch.manual_seed(seed)
    x0 = torch.randn(shape).to(dtype)
    x1 = (torch.randn(shape) * 2 + 1).to(dtype)
    t = torch.rand(shape[0])
    if shape[0] >= 3:
        t[0], t[1] = 0.0, 1.0   # both endpoints
    return x0, x1, t.to(t_dtype)


@pytest.mark.parametrize("sigma_min", SIGMAS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp32_matches_naive(backend, shape, sigma_min):
    x0, x1, t = make(shape)
    x_t, u_t = fm_interpolate(x0, x1, t, sigma_min)
    e_xt, e_ut = naive_fm_path(x0, x1, t, sigma_min)
    assert x_t.dtype == u_t.dtype == torch.float32
    assert x_t.shape == u_t.shape == x1.shape
    assert_close(x_t, e_xt, torch.float32)
    assert_close(u_t, e_ut, torch.float32)


def test_default_sigma_is_zero(backend):
    x0, x1, t = make((5, 3, 7), seed=1)
    for got, want in zip(fm_interpolate(x0, x1, t), fm_interpolate(x0, x1, t, 0.0)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("sigma_min", SIGMAS)
def test_endpoints_by_hand(backend, sigma_min):
    """t = 0 is noise x0; t = 1 is x1 + s x0; u_t is independent of t."""
    x0, x1, _ = make((4, 3, 5), seed=2)
    t = torch.tensor([0.0, 1.0, 0.0, 1.0])
    x_t, u_t = fm_interpolate(x0, x1, t, sigma_min)
    torch.testing.assert_close(x_t[0], x0[0], rtol=0, atol=0)
    torch.testing.assert_close(x_t[1].double(), x1[1].double() + sigma_min * x0[1].double(), rtol=1e-6, atol=1e-6)
    _, u_t2 = fm_interpolate(x0, x1, torch.rand(4), sigma_min)
    torch.testing.assert_close(u_t, u_t2, rtol=0, atol=0)


def test_t_broadcast_per_sample_by_hand(backend):
    x0, x1, t = make((3, 2, 4), seed=3)
    x_t, _ = fm_interpolate(x0, x1, t, 0.25)
    for b in range(3):
        tb = float(t[b])
        for c in range(2):
            for l in range(4):
                want = (1 - 0.75 * tb) * float(x0[b, c, l]) + tb * float(x1[b, c, l])
                assert abs(float(x_t[b, c, l]) - want) <= 1e-6 + 1e-6 * abs(want)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", [(3, 3, 300), (123, 7)], ids=str)
def test_low_precision(backend, shape, dtype):
    x0, x1, t = make(shape, dtype, seed=4)
    x_t, u_t = fm_interpolate(x0, x1, t, 0.1)
    assert x_t.dtype == u_t.dtype == dtype
    e_xt, e_ut = naive_fm_path(x0, x1, t, 0.1)
    assert_close(x_t, e_xt, dtype)
    assert_close(u_t, e_ut, dtype)


@pytest.mark.parametrize("x0_dtype,x1_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                               (torch.float16, torch.float32)])
def test_result_dtype_follows_x1(backend, x0_dtype, x1_dtype):
    x0, x1, t = make((3, 3, 17), seed=5)
    x0, x1 = x0.to(x0_dtype), x1.to(x1_dtype)
    x_t, u_t = fm_interpolate(x0, x1, t)
    assert x_t.dtype == u_t.dtype == x1_dtype
    e_xt, e_ut = naive_fm_path(x0, x1, t)
    assert_close(x_t, e_xt, x1_dtype)
    assert_close(u_t, e_ut, x1_dtype)


@pytest.mark.parametrize("t_dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_t_dtypes(backend, t_dtype):
    x0, x1, t = make((5, 3, 11), seed=6, t_dtype=t_dtype)
    x_t, u_t = fm_interpolate(x0, x1, t, 0.05)
    assert x_t.dtype == torch.float32
    e_xt, e_ut = naive_fm_path(x0, x1, t, 0.05)   # t as its dtype actually holds it
    assert_close(x_t, e_xt, torch.float32)
    assert_close(u_t, e_ut, torch.float32)


def test_non_contiguous(backend):
    torch.manual_seed(7)
    x0 = torch.randn(5, 11, 3).transpose(1, 2)
    x1 = torch.randn(5, 3, 22)[:, :, 1::2]
    t = torch.rand(10)[::2]
    assert not (x0.is_contiguous() or x1.is_contiguous() or t.is_contiguous())
    got = fm_interpolate(x0, x1, t, 0.1)
    ref = fm_interpolate(x0.contiguous(), x1.contiguous(), t.contiguous(), 0.1)
    for a, b, e in zip(got, ref, naive_fm_path(x0, x1, t, 0.1)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert_close(a, e, torch.float32)


@pytest.mark.parametrize("sigma_min", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(3, 2, 4), (2, 5)], ids=str)
def test_gradcheck_float64(backend, shape, sigma_min):
    x0, x1, t = make(shape, seed=8)
    x0, x1, t = d64(x0, grad=True), d64(x1, grad=True), d64(t)

    def fn(x0, x1):
        return fm_interpolate(x0, x1, t, sigma_min)

    for got, want in zip(fn(x0, x1), naive_fm_path(x0, x1, t, sigma_min)):
        assert_float64_precision(got, want)
    assert torch.autograd.gradcheck(fn, (x0, x1), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("sigma_min", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(3, 3, 127), (123, 7)], ids=str)
def test_fp32_grads(backend, shape, sigma_min):
    raw = make(shape, seed=9)
    x0, x1 = raw[0].clone().requires_grad_(True), raw[1].clone().requires_grad_(True)
    y0, y1 = d64(raw[0], grad=True), d64(raw[1], grad=True)
    g1, g2 = torch.randn(shape), torch.randn(shape)
    got = torch.autograd.grad(fm_interpolate(x0, x1, raw[2], sigma_min), (x0, x1), (g1, g2))
    want = torch.autograd.grad(naive_fm_path(y0, y1, raw[2], sigma_min), (y0, y1), (g1.double(), g2.double()))
    for name, a, b in zip(("x0", "x1"), got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


def _base():
    return make((3, 2, 5), seed=10)


@pytest.mark.parametrize("change,exc,match", [
    (dict(x1=torch.rand(3)), ValueError, "x1 must be batched"),
    (dict(x1=torch.zeros(3, 0, 5), x0=torch.zeros(3, 0, 5)), ValueError, "x1 must not be empty"),
    (dict(x1=torch.ones(3, 2, 5, dtype=torch.int64)), TypeError, "x1 must be float"),
    (dict(x0=torch.ones(3, 2, 5, dtype=torch.int32)), TypeError, "x0 must be float"),
    (dict(x0=torch.ones(3, 2, 4)), ValueError, "x0 must have shape"),
    (dict(x0=torch.ones(2, 5)), ValueError, "x0 must have shape"),
    (dict(x0=[[0.0]]), TypeError, "x0 must be a torch.Tensor"),
    (dict(t=torch.rand(4)), ValueError, "t must have shape"),
    (dict(t=torch.rand(3, 1)), ValueError, "t must have 1"),
    (dict(t=torch.tensor([0.5, -0.01, 0.2])), ValueError, "t must lie in"),
    (dict(t=torch.tensor([0.5, 1.01, 0.2])), ValueError, "t must lie in"),
    (dict(t=torch.tensor([0.5, math.nan, 0.2])), ValueError, "t must be finite"),
    (dict(t=torch.tensor([0.5, math.inf, 0.2])), ValueError, "t must be finite"),
    (dict(t=torch.tensor([0, 1, 0])), TypeError, "t must be float"),
    (dict(t=0.5), TypeError, "t must be a torch.Tensor"),
    (dict(sigma_min=1.0), ValueError, "sigma_min"),
    (dict(sigma_min=-0.1), ValueError, "sigma_min"),
    (dict(sigma_min=math.nan), ValueError, "sigma_min"),
    (dict(sigma_min="0.1"), TypeError, "sigma_min"),
    (dict(sigma_min=True), TypeError, "sigma_min"),
    (dict(sigma_min=torch.tensor(0.1)), TypeError, "sigma_min"),
])
def test_validation(change, exc, match):
    x0, x1, t = _base()
    args = dict(x0=x0, x1=x1, t=t, sigma_min=0.0)
    args.update(change)
    with pytest.raises(exc, match=match):
        fm_interpolate(**args)


@pytest.mark.parametrize("sigma_min", [0.0, 0.1])
def test_grad_t_matches_naive(backend, sigma_min):
    """dt_b = sum over the sample of dx_t * (x1 - (1 - s) x0); t rarely needs a gradient, but may."""
    torch.manual_seed(11)
    x0, x1 = torch.randn(3, 5, 17), torch.randn(3, 5, 17)
    t = torch.rand(3, requires_grad=True)
    gx, gu = torch.randn(3, 5, 17), torch.randn(3, 5, 17)
    x_t, u_t = fm_interpolate(x0, x1, t, sigma_min)
    ((x_t * gx).sum() + (u_t * gu).sum()).backward()
    want = (gx.double() * (x1.double() - (1 - sigma_min) * x0.double())).flatten(1).sum(1)
    torch.testing.assert_close(t.grad.double(), want, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64_with_t(backend):
    torch.manual_seed(12)
    x0 = torch.randn(3, 2, 7, dtype=torch.float64, requires_grad=True)
    x1 = torch.randn(3, 2, 7, dtype=torch.float64, requires_grad=True)
    t = (0.1 + 0.8 * torch.rand(3, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b, c: fm_interpolate(a, b, c, 0.1), (x0, x1, t), eps=1e-6, atol=1e-6,
                                    rtol=1e-5)
