"""attention (``softmax(q k^T / sqrt(hd)) v``) against a hand-written float64 softmax, on every backend."""
from __future__ import annotations

import math

import pytest
import torch

from flowfm_fast import ops
from flowfm_fast.ops import attention, use_backend
from naive import LOW_PRECISION, TOL, assert_float64_precision, backend_params, d64

OP = "attention"
# (B, H, T, hd): one token, odd and prime sizes, the DiT's (64, 4, 30, 32), a T past one vector.
SHAPES = [(1, 1, 1, 1), (2, 3, 7, 5), (3, 2, 37, 17), (1, 1, 30, 33), (64, 4, 30, 32), (2, 1, 65, 8)]


@pytest.fixture(params=backend_params(OP))
def backend(request):
    with use_backend(request.param):
        yield request.param


def naive_attention(q, k, v):
    s = (q.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1) / math.sqrt(q.shape[-1])  # (B, H, T, T), no matmul
    p = torch.exp(s - s.amax(-1, keepdim=True))
    p = p / p.sum(-1, keepdim=True)
    return (p.unsqueeze(-1) * v.unsqueeze(-3)).sum(-2)


def qkv_views(shape, dtype=torch.float32, seed=0):
    """q, k, v as the DiT makes them: a permuted view of one (B, T, 3, H, hd) projection."""
    torch.manual_seed(seed)
    b, h, t, d = shape
    qkv = torch.randn(b, t, 3, h, d).to(dtype)
    return qkv, qkv.permute(2, 0, 3, 1, 4)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp32_values_and_grads(backend, shape):
    qkv, _ = qkv_views(shape)
    leaf = qkv.clone().requires_grad_(True)
    q, k, v = leaf.permute(2, 0, 3, 1, 4)
    assert not q.is_contiguous() or shape[1] == shape[2] == 1
    out = attention(q, k, v)
    gy = torch.randn(shape)
    (g,) = torch.autograd.grad(out, leaf, gy)
    leaf64 = d64(qkv, grad=True)
    out64 = naive_attention(*leaf64.permute(2, 0, 3, 1, 4))
    (g64,) = torch.autograd.grad(out64, leaf64, gy.double())
    assert out.shape == shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), out64.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g.double(), g64, rtol=1e-5, atol=1e-5 * max(1.0, float(g64.abs().max())))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision(backend, dtype):
    _, (q, k, v) = qkv_views((2, 3, 30, 16), dtype=dtype)
    out = attention(q, k, v)
    assert out.dtype == dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double(), naive_attention(d64(q), d64(k), d64(v)), rtol=rtol, atol=atol)


def test_separate_contiguous_inputs(backend):
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 3, 11, 8) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v).double(), naive_attention(d64(q), d64(k), d64(v)),
                               rtol=1e-5, atol=1e-5)


def test_float64_gradcheck(backend):
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 2, 5, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert_float64_precision(attention(q, k, v), naive_attention(q, k, v))
    assert torch.autograd.gradcheck(attention, (q, k, v))


def test_torch_compile_fullgraph(backend):
    qkv, _ = qkv_views((2, 2, 9, 8))
    leaf = qkv.requires_grad_(True)

    def f(qkv):
        return attention(*qkv.permute(2, 0, 3, 1, 4)).square().mean()

    eager = f(leaf)
    (g_eager,) = torch.autograd.grad(eager, leaf)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(leaf)
    (g_out,) = torch.autograd.grad(out, leaf)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_out, g_eager, rtol=1e-6, atol=1e-6)


def test_long_sequences_take_the_reference():
    """The cpp kernel keeps T^2 probabilities per head: past MAX_T the dispatch picks the reference."""
    from flowfm_fast.ops import _registry
    from flowfm_fast.ops.attention import MAX_T
    q = torch.randn(1, 1, MAX_T + 1, 4)
    assert ops.attention(q, q, q).shape == q.shape
    assert _registry.select(OP, q.device, (False, False)) is _registry.impl_for(OP, "torch")
    if "cpp" in ops.backends_for(OP):
        from flowfm_fast import _backend
        if _registry.impl_for(OP, "cpp").rank("cpu", _backend.cpu_capability()) > 0:
            assert _registry.select(OP, q.device, (True, False)) is _registry.impl_for(OP, "cpp")
        else:  # ranked below the reference on this CPU capability
            assert _registry.select(OP, q.device, (True, False)) is _registry.impl_for(OP, "torch")
        assert _registry.select(OP, q.device, (True, True)) is _registry.impl_for(OP, "torch")  # CPU autocast
        with use_backend("cpp"), pytest.raises(RuntimeError, match="cpp.*attention"):
            ops.attention(q, q, q)


BAD = [
    (lambda q: attention(q[0], q, q), ValueError, "q must have 4 dimensions"),
    (lambda q: attention(q, q[:, :, :-1], q), ValueError, "k must have shape"),
    (lambda q: attention(q, q, q[..., :-1]), ValueError, "v must have shape"),
    (lambda q: attention(q, q.double(), q), TypeError, "k must have q's dtype"),
    (lambda q: attention(q, q, q.to("meta")), ValueError, "v is on meta"),
    (lambda q: attention(q.long(), q, q), TypeError, "q must be float32"),
    (lambda q: attention(q, "k", q), TypeError, "k must be a torch.Tensor"),
]


@pytest.mark.parametrize("fn,exc,match", BAD)
def test_bad_inputs_raise_clear_errors(backend, fn, exc, match):
    q = torch.randn(2, 3, 5, 4)
    with pytest.raises(exc, match=match):
        fn(q)


def test_kernel_checks_direct_calls():
    if "cpp" not in ops.backends_for(OP):
        pytest.skip("flowfm_fast._C is not built")
    q = torch.randn(2, 3, 5, 4)
    with pytest.raises(ValueError, match="k must have shape"):
        torch.ops.flowfm.attention(q, q[:, :, :-1], q, True)
    with pytest.raises(ValueError, match="attention: q must be"):
        torch.ops.flowfm.attention(q[0], q[0], q[0], True)


def test_nan_propagates_like_sdpa(backend):
    _, (q, k, v) = qkv_views((2, 2, 30, 16))
    q = q.clone()
    q[1, 0, 7, 3] = float("nan")
    out = attention(q, k, v)
    assert torch.isnan(out[1, 0, 7]).all()
    assert not torch.isnan(out[0]).any() and not torch.isnan(out[1, 1]).any()


def test_empty_batch_takes_the_reference(backend):
    q = torch.randn(0, 2, 5, 4)
    assert attention(q, q, q).shape == (0, 2, 5, 4)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_grads(backend, dtype):
    qkv, _ = qkv_views((2, 3, 30, 16), dtype=dtype)
    leaf = qkv.clone().requires_grad_(True)
    gy = torch.randn(2, 3, 30, 16).to(dtype)
    (g,) = torch.autograd.grad(attention(*leaf.permute(2, 0, 3, 1, 4)), leaf, gy)
    leaf64 = d64(qkv, grad=True)
    (g64,) = torch.autograd.grad(naive_attention(*leaf64.permute(2, 0, 3, 1, 4)), leaf64, gy.double())
    assert g.dtype == dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(g.double(), g64, rtol=rtol * 2, atol=atol * 2)


def test_probabilities_only_kept_for_a_backward():
    """Without a gradient to come (sampling) the kernel allocates no (B, H, T, T) probabilities,
    and the output is the same."""
    if "cpp" not in ops.backends_for(OP):
        pytest.skip("flowfm_fast._C is not built")
    _, (q, k, v) = qkv_views((3, 2, 30, 16))
    out_keep, probs = torch.ops.flowfm.attention(q, k, v, True)
    out_skip, none = torch.ops.flowfm.attention(q, k, v, False)
    assert probs.shape == (3, 2, 30, 30) and none.numel() == 0
    assert torch.equal(out_keep, out_skip)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 2, 30))
