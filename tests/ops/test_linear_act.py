"""linear_act (``act(x @ W.T + b)``) against a hand-written float64 product, on every backend."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flowfm_fast import nn as fnn
from flowfm_fast import ops
from flowfm_fast.ops import linear_act, use_backend
from naive import LOW_PRECISION, assert_float64_precision, backend_params, d64, naive_act

OP = "linear_act"
ACTS = [None, "silu", "gelu_tanh"]
# (x shape, out_features): odd and prime sizes, a single row and a single feature, 1-D x, and
# the DiT MLP's fc1 (64, 30, 128) x 512 and fc2 (64, 30, 512) x 128 (above the size where the cpp
# backend runs oneDNN: both orientations of its dW), and odd sizes there (masked tails, the scalar
# edges of the 16 x 16 transposes).
CASES = [((1, 1), 1), ((3, 7), 5), ((7,), 3), ((2, 5, 33), 65), ((123, 127), 31), ((4, 3, 300), 7),
         ((64, 30, 128), 512), ((64, 30, 512), 128), ((67, 29, 129), 257)]


@pytest.fixture(params=backend_params(OP))
def backend(request):
    with use_backend(request.param):
        yield request.param


def naive_linear_act(x, w, b, act):
    """float64, by broadcasting and summing (no matmul kernel)."""
    y = (x.unsqueeze(-2) * w).sum(-1)
    return naive_act(y if b is None else y + b, act)


def make(shape, n, dtype=torch.float32, bias=True, seed=0):
    torch.manual_seed(seed)
    k = shape[-1]
    x = torch.randn(shape).to(dtype)
    w = (torch.randn(n, k) / math.sqrt(k)).to(dtype)
    b = (0.5 * torch.randn(n)).to(dtype) if bias else None
    return x, w, b


def tol(dtype, k):
    """GEMM rounding grows with the reduction length k; bf16/fp16 round the output too."""
    if dtype in LOW_PRECISION:
        r = 2e-2 if dtype == torch.bfloat16 else 4e-3
        return dict(rtol=r, atol=r * math.sqrt(k) / 4)
    return dict(rtol=1e-5, atol=2e-6 * math.sqrt(k))


def grads_of(x, w, b, act, gy):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    y = linear_act(*leaves, act=act)
    wanted = [t for t in leaves if t is not None]
    return y, torch.autograd.grad(y, wanted, gy)


def naive_grads(x, w, b, act, gy):
    leaves = [d64(t, grad=True) for t in (x, w, b)]
    y = naive_linear_act(*leaves, act)
    return y, torch.autograd.grad(y, [t for t in leaves if t is not None], gy.double())


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fp32_values_and_grads(backend, case, act, bias):
    shape, n = case
    x, w, b = make(shape, n, bias=bias)
    gy = torch.randn(*shape[:-1], n)
    y, grads = grads_of(x, w, b, act, gy)
    y_ref, grads_ref = naive_grads(x, w, b, act, gy)
    assert y.dtype == torch.float32 and y.shape == (*shape[:-1], n)
    torch.testing.assert_close(y.double(), y_ref.detach(), **tol(torch.float32, shape[-1]))
    # dW and db sum over every row: their rounding grows with the row count and their magnitude.
    rows = max(1, x.numel() // shape[-1])
    for name, g, g_ref in zip(("dx", "dweight", "dbias"), grads, grads_ref):
        k = shape[-1] if name == "dx" else max(n, rows)
        t, scale = tol(torch.float32, k), max(1.0, float(g_ref.abs().max()))
        torch.testing.assert_close(g.double(), g_ref, rtol=t["rtol"], atol=t["atol"] * scale,
                                   msg=lambda m: f"{name}: {m}")


# The cpp backend's small-GEMM kernels (fp32, below DNN_MIN_WORK, from GEMM_SMALL_MIN_ROWS rows) in
# every CPU variant: row tiles of 6 and their tails, column panels of 64 (AVX-512) and 16 (AVX2)
# with masked tails, K off the 16 x 16 transposes' grid, and the sampling-time DiT shapes (M = 30).
SMALL = [((2, 1), 1), ((5, 15), 17), ((6, 16), 64), ((7, 17), 65), ((13, 33), 129), ((30, 128), 384),
         ((30, 512), 128), ((31, 131), 30), ((1, 30, 128), 512)]


@pytest.mark.skipif(not ops.backends_for(OP) or "cpp" not in ops.backends_for(OP), reason="no cpp backend")
@pytest.mark.parametrize("layout", ["contiguous", "strided", "weight_view"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("case", SMALL, ids=str)
def test_small_gemm_in_every_cpu_variant(case, act, layout):
    """Forward and every gradient against float64; ``strided``: x rows and the bias with gaps
    between elements of the bias and rows; ``weight_view``: W as the transpose of a (K, N) tensor,
    which the kernel reads in place instead of packing."""
    from flowfm_fast import _backend
    from flowfm_fast.ops.linear_act import DNN_MIN_WORK, GEMM_SMALL_MIN_ROWS
    shape, n = case
    x, w, b = make(shape, n, bias=act != "silu")
    rows, k = x.numel() // shape[-1], shape[-1]
    assert GEMM_SMALL_MIN_ROWS <= rows and rows * k * n < DNN_MIN_WORK
    if layout == "strided":
        x = torch.cat([x, torch.randn(*shape[:-1], 3)], -1)[..., :k]
        b = torch.stack([b, torch.randn(n)], -1)[:, 0] if b is not None else None
    elif layout == "weight_view":
        w = w.t().contiguous().t()
    gy = torch.randn(*shape[:-1], n)
    y_ref, grads_ref = naive_grads(x, w, b, act, gy)
    before = _backend.cpu_capability()
    try:
        for cap in _backend.cpu_capabilities():
            _backend.set_cpu_capability(cap)
            with use_backend("cpp"):
                y, grads = grads_of(x, w, b, act, gy)
            torch.testing.assert_close(y.double(), y_ref.detach(), **tol(torch.float32, k),
                                       msg=lambda m, c=cap: f"{c} y: {m}")
            for name, g, g_ref in zip(("dx", "dweight", "dbias"), grads, grads_ref):
                t, scale = tol(torch.float32, max(k, n, rows)), max(1.0, float(g_ref.abs().max()))
                torch.testing.assert_close(g.double(), g_ref, rtol=t["rtol"], atol=t["atol"] * scale,
                                           msg=lambda m, c=cap, name=name: f"{c} {name}: {m}")
    finally:
        _backend.set_cpu_capability(before)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("case", [((2, 5, 33), 65), ((64, 30, 128), 512)], ids=str)
def test_low_precision(backend, case, act, dtype):
    shape, n = case
    x, w, b = make(shape, n, dtype=dtype)
    gy = torch.randn(*shape[:-1], n).to(dtype)
    y, grads = grads_of(x, w, b, act, gy)
    y_ref, grads_ref = naive_grads(x, w, b, act, gy)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    torch.testing.assert_close(y.double(), y_ref.detach(), **tol(dtype, shape[-1]))
    rows = x.numel() // shape[-1]
    for name, g, g_ref in zip(("dx", "dweight", "dbias"), grads, grads_ref):
        k = shape[-1] if name == "dx" else rows
        # Scale by the gradient's own magnitude: dW and db sum thousands of low-precision products.
        scale = max(1.0, float(g_ref.abs().max()))
        t = tol(dtype, k)
        torch.testing.assert_close(g.double(), g_ref, rtol=t["rtol"], atol=t["atol"] * scale,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("act", ACTS)
def test_non_contiguous_inputs(backend, act):
    """x as a transposed view, W as the transpose of a (K, N) tensor, b as a strided slice."""
    torch.manual_seed(3)
    x = torch.randn(64, 300, 30).transpose(1, 2)[..., :129]  # (64, 30, 129), inner stride 30
    w = (torch.randn(129, 514) / 12.0).t()[:257]  # (257, 129), inner stride 514
    b = torch.randn(514)[::2]
    assert not (x.is_contiguous() or w.is_contiguous() or b.is_contiguous())
    gy = torch.randn(64, 30, 257)
    y, grads = grads_of(x, w, b, act, gy)
    y_ref, grads_ref = naive_grads(x, w, b, act, gy)
    torch.testing.assert_close(y.double(), y_ref.detach(), **tol(torch.float32, 129))
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref, **tol(torch.float32, 64 * 30))


def test_only_requested_grads(backend):
    """A frozen weight or an input without grad: the other gradients are still right."""
    x, w, b = make((5, 7, 33), 65)
    w = w.requires_grad_(True)
    y = linear_act(x, w, b, "silu")  # x and b need no gradient
    (gw,) = torch.autograd.grad(y.square().sum(), [w])
    w64 = d64(w, grad=True)
    y64 = naive_linear_act(d64(x), w64, d64(b), "silu")
    (gw_ref,) = torch.autograd.grad(y64.square().sum(), [w64])
    torch.testing.assert_close(gw.double(), gw_ref, **tol(torch.float32, 35))
    x2 = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(linear_act(x2, w.detach(), b, None).sum(), [x2])
    torch.testing.assert_close(gx, w.detach().sum(0).expand_as(x2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", ACTS)
def test_float64_gradcheck(backend, act):
    torch.manual_seed(4)
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert_float64_precision(linear_act(x, w, b, act), naive_linear_act(x, w, b, act))
    assert torch.autograd.gradcheck(lambda x, w, b: linear_act(x, w, b, act), (x, w, b))


def test_empty_batch(backend):
    x, w, b = make((0, 7), 3)
    y = linear_act(x, w, b, "silu")
    assert y.shape == (0, 3)


def test_torch_compile_fullgraph(backend):
    torch.manual_seed(5)
    args = [torch.randn(4, 6, 33, requires_grad=True), torch.randn(65, 33, requires_grad=True),
            torch.randn(65, requires_grad=True), torch.randn(17, 65, requires_grad=True)]

    def mlp(x, w1, b1, w2):
        return linear_act(linear_act(x, w1, b1, "gelu_tanh"), w2, None, None).square().mean()

    eager = mlp(*args)
    g_eager = torch.autograd.grad(eager, args)
    compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")
    out = compiled(*args)
    g_out = torch.autograd.grad(out, args)
    # Same kernels, but the GEMM library may pick another blocking for another buffer alignment:
    # rounding-level differences only.
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_out, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_autocast_runs_in_the_autocast_dtype_like_f_linear(backend):
    x, w, b = make((3, 5, 16), 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = nn.functional.linear(x, w, b)
        got = linear_act(x, w, b, None)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


BAD = [
    (lambda x, w, b: linear_act(x, w, b, "relu"), ValueError, "act"),
    (lambda x, w, b: linear_act(x, w[:, :-1], b), ValueError, "x must have shape"),
    (lambda x, w, b: linear_act(x, w, b[:-1]), ValueError, "bias must have shape"),
    (lambda x, w, b: linear_act(x, w[0], b), ValueError, "weight must have 2 dimensions"),
    (lambda x, w, b: linear_act(x.double(), w, b), TypeError, "weight must have x's dtype"),
    (lambda x, w, b: linear_act(x, w, b.double()), TypeError, "bias must have x's dtype"),
    (lambda x, w, b: linear_act(x.long(), w, b), TypeError, "x must be float32"),
    (lambda x, w, b: linear_act(x.numpy(), w, b), TypeError, "x must be a torch.Tensor"),
    (lambda x, w, b: linear_act(x, "w", b), TypeError, "weight must be a torch.Tensor"),
    (lambda x, w, b: linear_act(x, w, b.to("meta")), ValueError, "bias is on meta"),
]


@pytest.mark.parametrize("fn,exc,match", BAD)
def test_bad_inputs_raise_clear_errors(backend, fn, exc, match):
    x, w, b = make((3, 7), 5)
    with pytest.raises(exc, match=match):
        fn(x, w, b)


def test_kernel_checks_direct_calls():
    """torch.ops.flowfm.linear_act called directly (no Python validation) still refuses bad shapes."""
    if "cpp" not in ops.backends_for(OP):
        pytest.skip("flowfm_fast._C is not built")
    x, w, b = make((3, 7), 5)
    with pytest.raises(ValueError, match="linear_act: x must be"):
        torch.ops.flowfm.linear_act(x, w[:, :-1], b, "none")
    with pytest.raises(ValueError, match="bias must have shape"):
        torch.ops.flowfm.linear_act(x, w, b[:-1], "none")
    with pytest.raises(ValueError, match="act must be"):
        torch.ops.flowfm.linear_act(x, w, b, "relu")


def test_direct_calls_with_empty_operands_in_every_cpu_variant():
    """No output feature, no input feature, no row: the kernels (no Python validation in front)
    return the empty or bias-only results F.linear gives, in every CPU variant, and never crash."""
    from flowfm_fast import _backend
    if "cpp" not in ops.backends_for(OP):
        pytest.skip("flowfm_fast._C is not built")
    before = _backend.cpu_capability()
    try:
        for cap in _backend.cpu_capabilities():
            _backend.set_cpu_capability(cap)
            for (m, k, n) in ((7, 5, 0), (7, 0, 3), (0, 5, 3), (8, 0, 70)):
                x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
                y = torch.ops.flowfm.linear_act(x, w, b, "none")[0]
                torch.testing.assert_close(y, F.linear(x, w, b), msg=lambda msg, c=cap: f"{c} {(m, k, n)}: {msg}")
                gy = torch.randn(m, n)
                dx, dw, db = torch.ops.flowfm.linear_act_backward(gy, x, w, y, "none", True, True, True)
                torch.testing.assert_close(dx, gy @ w)
                torch.testing.assert_close(dw, gy.t() @ x)
                torch.testing.assert_close(db, gy.sum(0))
    finally:
        _backend.set_cpu_capability(before)


# ----------------------------------------------------------------------------- the module


def test_linear_module_is_a_drop_in_for_nn_linear(backend):
    torch.manual_seed(6)
    ref = nn.Linear(33, 65)
    mod = fnn.Linear(33, 65, act="gelu_tanh")
    mod.load_state_dict(ref.state_dict())  # same keys and shapes both ways
    ref.load_state_dict(mod.state_dict())
    x = torch.randn(4, 33)
    want = nn.functional.gelu(ref(x), approximate="tanh")
    torch.testing.assert_close(mod(x), want, rtol=1e-5, atol=1e-5)
    assert "act='gelu_tanh'" in repr(mod)
    with pytest.raises(ValueError, match="act"):
        fnn.Linear(3, 4, act="relu")


def test_backward_through_a_stride_zero_gradient(backend):
    """y.sum() hands the backward an expanded (stride-0) dy: a GEMM operand the kernels copy first."""
    x, w, b = make((64, 30, 128), 512)
    w = w.requires_grad_(True)
    (gw,) = torch.autograd.grad(linear_act(x, w, b, None).sum(), [w])
    torch.testing.assert_close(gw, x.reshape(-1, 128).sum(0).expand_as(w), rtol=1e-5, atol=1e-3)


def test_nan_propagates(backend):
    x, w, b = make((64, 30, 128), 512)
    x[3, 4, 5] = float("nan")
    y = linear_act(x, w, b, "gelu_tanh")
    assert torch.isnan(y[3, 4]).all() and not torch.isnan(y[3, 5]).any()


def test_second_order_raises_on_the_cpp_path():
    if "cpp" not in ops.backends_for(OP):
        pytest.skip("flowfm_fast._C is not built")
    x, w, b = make((64, 30, 128), 512)
    x.requires_grad_(True)
    with use_backend("cpp"):
        y = linear_act(x, w, b, "gelu_tanh")
        with pytest.raises(RuntimeError, match="no derivative"):
            torch.autograd.grad(y.square().sum(), [x], create_graph=True)


def test_runs_reference_says_which_calls_the_reference_computes():
    """nn.Linear's shortcut and the compiled op skip the op exactly where it would compute the
    reference: off the CPU, one row, not fp32, the baseline variant; never where our GEMM or
    oneDNN takes the call."""
    from flowfm_fast import _backend
    from flowfm_fast.ops.linear_act import DNN_MIN_WORK, runs_reference
    w = torch.empty(64, 128)
    assert runs_reference(torch.empty(30, 128, device="meta"), w)
    big = torch.empty(DNN_MIN_WORK // w.numel() + 1, 128)
    if "cpp" not in ops.backends_for(OP):
        assert runs_reference(big, w) and runs_reference(torch.empty(30, 128), w)
        return
    assert not runs_reference(big, w)
    assert runs_reference(torch.empty(1, 128), w)
    assert runs_reference(torch.empty(30, 128, dtype=torch.float64), w.double())
    before = _backend.cpu_capability()
    try:
        for cap in _backend.cpu_capabilities():
            _backend.set_cpu_capability(cap)
            assert runs_reference(torch.empty(2, 15, 128), w) == (cap == "default"), cap
    finally:
        _backend.set_cpu_capability(before)
