"""timestep_embedding against a table built element by element with math.cos / math.sin."""
from __future__ import annotations

import math

import pytest
import torch

from flowfm_fast.ops import timestep_embedding, use_backend
from naive import assert_close, backend_params, naive_timestep_embedding

OP = "timestep_embedding"
FP32_ULP = 2.0 ** -23


@pytest.fixture(params=backend_params(OP))
def backend(request):
    with use_backend(request.param):
        yield request.param


@pytest.mark.parametrize("dim", [1, 2, 7, 127, 300])
@pytest.mark.parametrize("n", [1, 3, 123])
def test_float_times_match_naive(backend, n, dim):
    torch.manual_seed(n * 1000 + dim)
    t = torch.rand(n)
    t[0] = 0.0 if n > 1 else t[0]
    emb = timestep_embedding(t, dim)
    assert emb.shape == (n, dim)
    assert emb.dtype == torch.float32
    assert_close(emb, naive_timestep_embedding(t, dim), torch.float32)


@pytest.mark.parametrize("max_period", [10000.0, 100, 2.5, 1.0])
@pytest.mark.parametrize("dim", [6, 33])
def test_max_period(backend, dim, max_period):
    torch.manual_seed(1)
    t = torch.rand(17)
    emb = timestep_embedding(t, dim, max_period=max_period)
    assert_close(emb, naive_timestep_embedding(t, dim, float(max_period)), torch.float32)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16])
@pytest.mark.parametrize("dim", [7, 128, 301])
def test_integer_steps(backend, dtype, dim):
    """DDPM-style integer steps 0..999: fp32 args t * f_k carry ~1 ulp of |t f_k| error."""
    t = torch.tensor([0, 1, 2, 17, 250, 499, 500, 998, 999], dtype=dtype)
    emb = timestep_embedding(t, dim)
    assert emb.dtype == torch.float32
    atol = 1e-5 + 4 * FP32_ULP * 999
    torch.testing.assert_close(emb.double(), naive_timestep_embedding(t, dim), rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_output_is_fp32_whatever_t_dtype(backend, dtype):
    torch.manual_seed(2)
    t = torch.rand(31).to(dtype)
    emb = timestep_embedding(t, 65)
    assert emb.dtype == torch.float32
    # Compare against the values t actually holds (rounded to its dtype).
    assert_close(emb, naive_timestep_embedding(t, 65), torch.float32)


@pytest.mark.parametrize("dim", [1, 3, 127])
def test_odd_dim_zero_column_and_layout(backend, dim):
    torch.manual_seed(3)
    t = torch.rand(5)
    emb = timestep_embedding(t, dim)
    half = dim // 2
    assert torch.equal(emb[:, -1], torch.zeros(5))
    # [cos, sin] order: column 0 is cos(t * 1), column half is sin(t * 1).
    if half:
        torch.testing.assert_close(emb[:, 0].double(), t.double().cos(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(emb[:, half].double(), t.double().sin(), rtol=1e-6, atol=1e-6)


def test_t_zero_gives_ones_then_zeros(backend):
    emb = timestep_embedding(torch.zeros(4), 10)
    assert torch.equal(emb[:, :5], torch.ones(4, 5))
    assert torch.equal(emb[:, 5:], torch.zeros(4, 5))


def test_rows_satisfy_pythagoras(backend):
    torch.manual_seed(4)
    t = torch.rand(9) * 50
    emb = timestep_embedding(t, 64).double()
    norm = emb[:, :32] ** 2 + emb[:, 32:] ** 2
    torch.testing.assert_close(norm, torch.ones_like(norm), rtol=0, atol=1e-5)


def test_non_contiguous_t(backend):
    torch.manual_seed(5)
    base = torch.rand(2, 40)
    t = base[1, ::3]
    assert not t.is_contiguous()
    emb = timestep_embedding(t, 21)
    torch.testing.assert_close(emb, timestep_embedding(t.contiguous(), 21), rtol=0, atol=0)
    assert_close(emb, naive_timestep_embedding(t, 21), torch.float32)


@pytest.mark.parametrize("t,dim,kwargs,exc,match", [
    ([0.1, 0.2], 8, {}, TypeError, "t must be a torch.Tensor"),
    (0.5, 8, {}, TypeError, "t must be a torch.Tensor"),
    (torch.rand(2, 3), 8, {}, ValueError, "t must have 1 dimensions"),
    (torch.tensor(0.5), 8, {}, ValueError, "t must have 1 dimensions"),
    (torch.zeros(0), 8, {}, ValueError, "t must not be empty"),
    (torch.tensor([True, False]), 8, {}, TypeError, "t must be a real"),
    (torch.zeros(2, dtype=torch.complex64), 8, {}, TypeError, "t must be a real"),
    (torch.rand(3), 0, {}, ValueError, "dim"),
    (torch.rand(3), -4, {}, ValueError, "dim"),
    (torch.rand(3), 8.0, {}, ValueError, "dim"),
    (torch.rand(3), True, {}, ValueError, "dim"),
    (torch.rand(3), 8, {"max_period": 0.0}, ValueError, "max_period"),
    (torch.rand(3), 8, {"max_period": -10.0}, ValueError, "max_period"),
    (torch.rand(3), 8, {"max_period": "10000"}, TypeError, "max_period"),
    (torch.rand(3), 8, {"max_period": math.nan}, ValueError, "max_period"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_validation(t, dim, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        timestep_embedding(t, dim, **kwargs)


def naive_timestep_embedding_diff(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """The same table as tensor arithmetic in float64, so autograd gives d emb / d t."""
    half = dim // 2
    freqs = torch.tensor([math.exp(-math.log(max_period) * k / half) for k in range(half)], dtype=torch.float64)
    args = t.double()[:, None] * freqs[None, :]
    out = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return torch.nn.functional.pad(out, (0, dim % 2))


@pytest.mark.parametrize("dim", [1, 7, 64, 301])
def test_grad_t_matches_naive_autograd(backend, dim):
    torch.manual_seed(dim)
    t = torch.rand(5, requires_grad=True)
    demb = torch.randn(5, dim)
    (timestep_embedding(t, dim) * demb).sum().backward()
    t64 = t.detach().double().requires_grad_(True)
    (naive_timestep_embedding_diff(t64, dim) * demb.double()).sum().backward()
    assert t.grad.dtype == torch.float32
    # d/dt of cos(t f) is bounded by f <= 1 per column: the fp32 table bounds the error.
    torch.testing.assert_close(t.grad.double(), t64.grad, rtol=1e-5, atol=1e-5 * math.sqrt(dim))


def test_gradcheck_float64(backend):
    t = (torch.rand(4, dtype=torch.float64) * 0.5).requires_grad_(True)
    # The output is fp32 by contract, so the numerical Jacobian is only fp32-accurate.
    assert torch.autograd.gradcheck(lambda t: timestep_embedding(t, 9).double(), (t,), eps=1e-3, atol=2e-3,
                                    rtol=1e-2)


def test_every_quadrant_and_large_arguments(backend):
    """dim = 2: one frequency, 1, so the arguments are t itself: cos / sin over many periods
    (every quadrant, both signs) within 2e-6 of float64 libm, and beyond the fast kernel's range
    (|t| > 8192, inf, NaN) the same as torch.cos / torch.sin of fp32 t."""
    t = torch.cat([torch.linspace(-8192.0, 8192.0, 200_003), torch.tensor([0.0, -0.0, 1e-30, 8191.9])])
    emb = timestep_embedding(t, 2)
    assert (emb[:, 0].double() - torch.cos(t.double())).abs().max() < 2e-6
    assert (emb[:, 1].double() - torch.sin(t.double())).abs().max() < 2e-6
    t = torch.tensor([1e5, -3.0e7, 2.0, float("inf"), float("nan")])
    emb = timestep_embedding(t, 2)
    torch.testing.assert_close(emb, torch.stack([torch.cos(t), torch.sin(t)], 1), equal_nan=True,
                               atol=1e-5, rtol=0)
