"""fm_loss against mean_b w_b * mean_{C,L} (v - u_t)^2 with u_t = x1 - (1 - s) x0, in float64."""
from __future__ import annotations

import math

import pytest
import torch

from flowfm_fast.ops import fm_loss, use_backend
from naive import (LOW_PRECISION, assert_close, assert_float64_precision, backend_params, d64,
                   naive_fm_loss)

OP = "fm_loss"
SHAPES = [(1, 1), (3, 7), (1, 3, 300), (3, 1, 127), (123, 3, 7), (3, 2, 5, 7)]


@pytest.fixture(params=backend_params(OP))
def backend(request):
    with use_backend(request.param):
        yield request.param


def make(shape, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    v = torch.randn(shape).to(dtype)
    x0 = torch.randn(shape).to(dtype)
    x1 = (torch.randn(shape) * 2 + 1).to(dtype)
    t = torch.rand(shape[0])
    w = (torch.rand(shape[0]) * 2).to(dtype)
    return v, x0, x1, t, w


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("sigma_min", [0.0, 0.1, 0.999])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp32_matches_naive(backend, shape, sigma_min, weighted):
    v, x0, x1, t, w = make(shape)
    w = w if weighted else None
    loss = fm_loss(v, x0, x1, t, weight=w, sigma_min=sigma_min)
    assert loss.dtype == torch.float32
    assert loss.shape == ()
    assert_close(loss, naive_fm_loss(v, x0, x1, w, sigma_min), torch.float32)


def test_by_hand_loops(backend):
    v, x0, x1, t, w = make((3, 2, 4), seed=1)
    total = 0.0
    for b in range(3):
        acc = 0.0
        for c in range(2):
            for l in range(4):
                u = float(x1[b, c, l]) - 0.8 * float(x0[b, c, l])
                acc += (float(v[b, c, l]) - u) ** 2
        total += float(w[b]) * acc / 8
    loss = fm_loss(v, x0, x1, t, weight=w, sigma_min=0.2)
    assert abs(float(loss) - total / 3) <= 1e-5 * abs(total / 3)


def test_weight_none_equals_ones_and_t_is_irrelevant(backend):
    v, x0, x1, t, _ = make((5, 3, 11), seed=2)
    a = fm_loss(v, x0, x1, t)
    b = fm_loss(v, x0, x1, t, weight=torch.ones(5))
    c = fm_loss(v, x0, x1, torch.rand(5))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_perfect_prediction_is_zero(backend):
    _, x0, x1, t, w = make((4, 3, 9), seed=3)
    v = x1 - 0.7 * x0
    loss = fm_loss(v, x0, x1, t, weight=w, sigma_min=0.3)
    assert float(loss) < 1e-10


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", [(3, 3, 300), (123, 7)], ids=str)
def test_low_precision_gives_fp32_scalar(backend, shape, dtype, weighted):
    v, x0, x1, t, w = make(shape, dtype, seed=4)
    w = w if weighted else None
    loss = fm_loss(v, x0, x1, t, weight=w, sigma_min=0.1)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, naive_fm_loss(v, x0, x1, w, 0.1), dtype)


def test_non_contiguous(backend):
    torch.manual_seed(5)
    v = torch.randn(5, 13, 3).transpose(1, 2)
    x0 = torch.randn(3, 5, 13).transpose(0, 1)
    x1 = torch.randn(5, 3, 26)[:, :, ::2]
    t = torch.rand(10)[1::2]
    w = torch.rand(5, 2)[:, 1]
    assert not any(z.is_contiguous() for z in (v, x0, x1, t, w))
    loss = fm_loss(v, x0, x1, t, weight=w, sigma_min=0.05)
    ref = fm_loss(v.contiguous(), x0.contiguous(), x1.contiguous(), t.contiguous(), weight=w.contiguous(),
                  sigma_min=0.05)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    assert_close(loss, naive_fm_loss(v, x0, x1, w, 0.05), torch.float32)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(3, 2, 4), (2, 5)], ids=str)
def test_gradcheck_float64(backend, shape, weighted):
    v, x0, x1, t, w = make(shape, seed=6)
    t = d64(t)
    inputs = [d64(v, grad=True), d64(x0, grad=True), d64(x1, grad=True)]
    if weighted:
        inputs.append(d64(w, grad=True))

    def fn(v, x0, x1, w=None):
        return fm_loss(v, x0, x1, t, weight=w, sigma_min=0.2)

    assert_float64_precision(fn(*inputs), naive_fm_loss(*inputs[:3], inputs[3] if weighted else None, 0.2))
    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(3, 3, 127), (123, 7), (1, 1)], ids=str)
def test_fp32_grads(backend, shape, weighted):
    raw = list(make(shape, seed=7))
    names = ["v", "x0", "x1"] + (["weight"] if weighted else [])
    idx = [0, 1, 2] + ([4] if weighted else [])
    ins32 = [raw[i].clone().requires_grad_(True) for i in idx]
    ins64 = [d64(raw[i], grad=True) for i in idx]
    w32 = ins32[3] if weighted else None
    w64 = ins64[3] if weighted else None
    got = torch.autograd.grad(fm_loss(*ins32[:3], raw[3], weight=w32, sigma_min=0.1), ins32)
    want = torch.autograd.grad(naive_fm_loss(*ins64[:3], w64, 0.1), ins64)
    for name, a, b in zip(names, got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6, msg=lambda m: f"grad {name}: {m}")


def test_dv_closed_form(backend):
    """dv = 2 w_b (v - u_t) / (B * numel_per_sample), as the module docstring promises."""
    v, x0, x1, t, w = make((4, 3, 10), seed=8)
    v = v.clone().requires_grad_(True)
    (dv,) = torch.autograd.grad(fm_loss(v, x0, x1, t, weight=w, sigma_min=0.1), v)
    u = x1.double() - 0.9 * x0.double()
    want = 2 * w.double()[:, None, None] * (v.detach().double() - u) / (4 * 30)
    torch.testing.assert_close(dv.double(), want, rtol=1e-5, atol=1e-7)


def _base():
    return make((3, 2, 5), seed=9)


@pytest.mark.parametrize("change,exc,match", [
    (dict(v=torch.ones(3, 2, 4)), ValueError, "v must have shape"),
    (dict(v=torch.ones(3, 2, 5, dtype=torch.int32)), TypeError, "v must be float"),
    (dict(v=None), TypeError, "v must be a torch.Tensor"),
    (dict(x0=torch.ones(3, 5)), ValueError, "x0 must have shape"),
    (dict(x1=torch.ones(3)), ValueError, "x1 must be batched"),
    (dict(x1=torch.ones(3, 0, 5), x0=torch.ones(3, 0, 5), v=torch.ones(3, 0, 5)), ValueError, "x1 must not be empty"),
    (dict(weight=torch.ones(4)), ValueError, "weight must have shape"),
    (dict(weight=torch.ones(3, 1)), ValueError, "weight must have 1"),
    (dict(weight=torch.ones(3, dtype=torch.int64)), TypeError, "weight must be float"),
    (dict(t=torch.tensor([0.1, 2.0, 0.3])), ValueError, "t must lie in"),
    (dict(t=torch.tensor([0.1, -1e-3, 0.3])), ValueError, "t must lie in"),
    (dict(t=torch.tensor([0.1, math.nan, 0.3])), ValueError, "t must be finite"),
    (dict(t=torch.rand(2)), ValueError, "t must have shape"),
    (dict(sigma_min=1.0), ValueError, "sigma_min"),
    (dict(sigma_min=-0.5), ValueError, "sigma_min"),
    (dict(sigma_min="0"), TypeError, "sigma_min"),
])
def test_validation(change, exc, match):
    v, x0, x1, t, w = _base()
    args = dict(v=v, x0=x0, x1=x1, t=t, weight=w, sigma_min=0.0)
    args.update(change)
    with pytest.raises(exc, match=match):
        fm_loss(**args)


@pytest.mark.parametrize("bad_weight", [[1.0, 1.0, 1.0], 2.0], ids=["list", "float"])
def test_non_tensor_weight_raises_type_error(bad_weight):
    v, x0, x1, t, _ = _base()
    with pytest.raises(TypeError, match="weight"):
        fm_loss(v, x0, x1, t, weight=bad_weight)
