"""euler_step_ (in place) and rk_combine against naive float64 sums."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowfm_fast.ops import euler_step_, rk_combine, use_backend
from naive import LOW_PRECISION, TOL, assert_close, backend_params

SHAPES = [(1,), (7,), (3, 127), (123, 3, 7), (2, 3, 300)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=backend_params("euler_step_"))
def euler_backend(request):
    with use_backend(request.param):
        yield request.param


@pytest.fixture(params=backend_params("rk_combine"))
def rk_backend(request):
    with use_backend(request.param):
        yield request.param


def rand(shape, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.randn(shape).to(dtype)


def naive_combine(x, dt, ks, bs):
    """x + dt * sum_i b_i k_i in float64 numpy, term by term."""
    acc = np.zeros(x.shape, dtype=np.float64)
    for k, b in zip(ks, bs):
        acc += float(b) * k.double().cpu().numpy()
    return torch.from_numpy(x.double().cpu().numpy() + float(dt) * acc).to(x.device)


# ----------------------------------------------------------------------------- euler_step_


@pytest.mark.parametrize("dt", [0.1, -0.25, 1, 0.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_euler_in_place(euler_backend, shape, dtype, dt):
    x = rand(shape, dtype, seed=1)
    v = rand(shape, dtype, seed=2)
    expected = x.double() + float(dt) * v.double()
    ptr = x.data_ptr()
    out = euler_step_(x, v, dt)
    assert out is x
    assert x.data_ptr() == ptr and x.dtype == dtype
    assert_close(x, expected, dtype)


def test_euler_mixed_dtype_velocity(euler_backend):
    x = rand((3, 50), torch.float32, seed=3)
    v = rand((3, 50), torch.bfloat16, seed=4)
    expected = x.double() + 0.3 * v.double()
    assert euler_step_(x, v, 0.3) is x
    assert x.dtype == torch.float32
    assert_close(x, expected, torch.float32)


def test_euler_non_contiguous_view_updates_base(euler_backend):
    base = rand((4, 10, 6), seed=5)
    before = base.clone()
    x = base.transpose(1, 2)[:, ::2]           # (4, 3, 10) strided view
    v = rand((4, 10, 3), seed=6).transpose(1, 2)
    assert not (x.is_contiguous() or v.is_contiguous())
    expected = x.double() + 0.5 * v.double()
    assert euler_step_(x, v, 0.5) is x
    assert_close(x, expected, torch.float32)
    # the base sees the update through the view, and nothing else changed
    mask = torch.zeros_like(base, dtype=torch.bool)
    mask.transpose(1, 2)[:, ::2] = True
    assert torch.equal(base[~mask], before[~mask])
    assert_close(base.transpose(1, 2)[:, ::2], expected, torch.float32)


@pytest.mark.parametrize("args,exc,match", [
    (lambda x, v: (x, v[:2], 0.1), ValueError, "v must have shape"),
    (lambda x, v: (x, v.T, 0.1), ValueError, "v must have shape"),
    (lambda x, v: (x.int(), v, 0.1), TypeError, "x must be float"),
    (lambda x, v: (x, v.long(), 0.1), TypeError, "v must be float"),
    (lambda x, v: (x.tolist(), v, 0.1), TypeError, "x must be a torch.Tensor"),
    (lambda x, v: (x[:0], v[:0], 0.1), ValueError, "x must not be empty"),
    (lambda x, v: (x, v, math.nan), ValueError, "dt must be finite"),
    (lambda x, v: (x, v, math.inf), ValueError, "dt must be finite"),
    (lambda x, v: (x, v, -math.inf), ValueError, "dt must be finite"),
    (lambda x, v: (x, v, torch.tensor(0.1)), TypeError, "dt must be a float"),
    (lambda x, v: (x, v, "0.1"), TypeError, "dt must be a float"),
    (lambda x, v: (x, v, True), TypeError, "dt must be a float"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_euler_validation(args, exc, match):
    x, v = rand((3, 5), seed=7), rand((3, 5), seed=8)
    x_before = x.clone()
    with pytest.raises(exc, match=match):
        euler_step_(*args(x, v))
    assert torch.equal(x, x_before)   # a rejected call does not touch x


# ----------------------------------------------------------------------------- rk_combine

# Butcher weights of common methods (the final combine), plus arbitrary ones with zeros.
BS = {
    "euler": [1.0],
    "midpoint": [0.0, 1.0],
    "heun": [0.5, 0.5],
    "rk4": [1 / 6, 1 / 3, 1 / 3, 1 / 6],
    "ralston": [0.25, 0.75],
    "arbitrary6": [0.3, -1.25, 0.0, 2.0, 1e-3, -0.7],
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", list(BS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rk_combine_new_tensor(rk_backend, shape, method, dtype):
    bs = BS[method]
    x = rand(shape, dtype, seed=10)
    ks = [rand(shape, dtype, seed=11 + i) for i in range(len(bs))]
    x_before = x.clone()
    out = rk_combine(x, 0.125, ks, bs)
    assert out is not x and out.data_ptr() != x.data_ptr()
    assert torch.equal(x, x_before)
    assert out.dtype == dtype and out.shape == x.shape
    scale = 1.0 if dtype == torch.float32 else 2.0   # low precision: several rounded terms
    assert_close(out, naive_combine(x, 0.125, ks, bs), dtype, scale=scale)


@pytest.mark.parametrize("method", ["heun", "rk4", "arbitrary6"])
def test_rk_combine_out_is_x(rk_backend, method):
    bs = BS[method]
    x = rand((3, 3, 127), seed=20)
    ks = [rand((3, 3, 127), seed=21 + i) for i in range(len(bs))]
    expected = naive_combine(x, -0.2, ks, bs)
    ptr = x.data_ptr()
    out = rk_combine(x, -0.2, ks, bs, out=x)
    assert out is x and x.data_ptr() == ptr
    assert_close(x, expected, torch.float32)


@pytest.mark.parametrize("method", ["midpoint", "rk4"])
def test_rk_combine_separate_out(rk_backend, method):
    bs = BS[method]
    x = rand((5, 300), seed=30)
    ks = [rand((5, 300), seed=31 + i) for i in range(len(bs))]
    out = torch.full((5, 300), math.nan)
    x_before = x.clone()
    ret = rk_combine(x, 0.5, ks, bs, out=out)
    assert ret is out
    assert torch.equal(x, x_before)
    assert_close(out, naive_combine(x, 0.5, ks, bs), torch.float32)


def test_rk_combine_non_contiguous_out_and_inputs(rk_backend):
    x = rand((7, 12), seed=40).t()
    ks = [rand((7, 12), seed=41).t(), rand((12, 14), seed=42)[:, ::2]]
    base = torch.zeros(7, 12)
    out = base.t()
    assert not (x.is_contiguous() or out.is_contiguous() or ks[1].is_contiguous())
    ret = rk_combine(x, 0.3, ks, [0.5, 0.5], out=out)
    assert ret is out
    expected = naive_combine(x, 0.3, ks, [0.5, 0.5])
    assert_close(out, expected, torch.float32)
    assert_close(base.t(), expected, torch.float32)   # written through the view


def test_rk_combine_all_zero_weights_copies_x(rk_backend):
    x = rand((3, 11), seed=50)
    ks = [rand((3, 11), seed=51), rand((3, 11), seed=52)]
    out = rk_combine(x, 0.7, ks, [0.0, 0.0])
    assert out is not x
    assert torch.equal(out, x)
    buf = torch.empty(3, 11)
    assert rk_combine(x, 0.7, ks, [0, 0], out=buf) is buf
    assert torch.equal(buf, x)


def test_rk_combine_equals_repeated_euler_for_one_stage(rk_backend):
    x = rand((4, 3, 9), seed=60)
    k = rand((4, 3, 9), seed=61)
    out = rk_combine(x, 0.05, [k], [1.0])
    x2 = x.clone()
    euler_step_(x2, k, 0.05)
    torch.testing.assert_close(out, x2, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_rk_combine_fp32_stages_into_low_precision_state(rk_backend, dtype):
    """ks in fp32 combined into a low-precision x keeps x's dtype."""
    x = rand((3, 64), dtype, seed=70)
    ks = [rand((3, 64), seed=71 + i) for i in range(4)]
    out = rk_combine(x, 0.1, ks, BS["rk4"])
    assert out.dtype == dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double(), naive_combine(x, 0.1, ks, BS["rk4"]), rtol=rtol, atol=atol)


@pytest.mark.parametrize("call,exc,match", [
    (lambda x, ks: rk_combine(x, 0.1, ks, [0.5]), ValueError, "ks and bs"),
    (lambda x, ks: rk_combine(x, 0.1, ks, [0.2, 0.3, 0.5]), ValueError, "ks and bs"),
    (lambda x, ks: rk_combine(x, 0.1, [], []), ValueError, "ks and bs"),
    (lambda x, ks: rk_combine(x, 0.1, [ks[0], ks[1][:, :2]], [0.5, 0.5]), ValueError, r"ks\[1\] must have shape"),
    (lambda x, ks: rk_combine(x, 0.1, [ks[0].int(), ks[1]], [0.5, 0.5]), TypeError, r"ks\[0\] must be float"),
    (lambda x, ks: rk_combine(x, 0.1, [ks[0], 1.0], [0.5, 0.5]), TypeError, r"ks\[1\] must be a torch.Tensor"),
    (lambda x, ks: rk_combine(x, 0.1, ks, [0.5, math.nan]), ValueError, "bs must be finite"),
    (lambda x, ks: rk_combine(x, 0.1, ks, [math.inf, 0.5]), ValueError, "bs must be finite"),
    (lambda x, ks: rk_combine(x, math.nan, ks, [0.5, 0.5]), ValueError, "dt must be finite"),
    (lambda x, ks: rk_combine(x, math.inf, ks, [0.5, 0.5]), ValueError, "dt must be finite"),
    (lambda x, ks: rk_combine(x, None, ks, [0.5, 0.5]), TypeError, "dt must be a float"),
    (lambda x, ks: rk_combine(x, 0.1, ks, [0.5, 0.5], out=torch.empty(3, 4)), ValueError, "out must have shape"),
    (lambda x, ks: rk_combine(x, 0.1, ks, [0.5, 0.5], out=torch.empty(3, 5, dtype=torch.int32)), TypeError,
     "out must be float"),
    (lambda x, ks: rk_combine(x.long(), 0.1, ks, [0.5, 0.5]), TypeError, "x must be float"),
    (lambda x, ks: rk_combine(x[:, :0], 0.1, [k[:, :0] for k in ks], [0.5, 0.5]), ValueError, "x must not be empty"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_rk_combine_validation(call, exc, match):
    x = rand((3, 5), seed=80)
    ks = [rand((3, 5), seed=81), rand((3, 5), seed=82)]
    x_before = x.clone()
    with pytest.raises(exc, match=match):
        call(x, ks)
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("alias", ["x", "first", "last"])
def test_rk_combine_many_stages_with_out_aliasing_an_input(rk_backend, alias):
    """13 stages (more than one kernel pass takes) with out being x or one of the stages."""
    torch.manual_seed(13)
    x = torch.randn(3, 2, 11)
    ks = [torch.randn(3, 2, 11) for _ in range(13)]
    bs = [0.1 * (i + 1) * (-1) ** i for i in range(13)]
    want = x.double() + 0.3 * sum(b * k.double() for b, k in zip(bs, ks))
    out = {"x": x, "first": ks[0], "last": ks[-1]}[alias]
    got = rk_combine(x, 0.3, ks, bs, out=out)
    assert got is out
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
