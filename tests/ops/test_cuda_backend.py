"""The CUDA C++ kernels (csrc/<op>/cuda.cu, the ``cuda`` backend) against the float64 naive formulas.

Runs only where a GPU is present and the loaded extension was built with CUDA kernels; elsewhere
every test here is skipped (tests/test_cuda_sources.py still compile-checks the kernels).
Each op is exercised twice where it can be:
- directly, ``torch.ops.flowfm.<op>`` with its backward op, so the kernels are covered even before
  an op's Python file registers the compiled backend;
- through the public API under ``use_backend("cuda")`` with autograd, when the op's ``cuda``
  backend is registered.
Tolerances: fp32 forward values within 1e-5 (rel and abs) of float64; gradients that are sums over
rows/groups within 1e-4, as in the CPU tests; bf16/fp16 with ``naive.TOL``.
"""
from __future__ import annotations

import pytest
import torch

import flowfm_fast.ops as ops
from flowfm_fast.ops import _ext, backends_for, use_backend
from naive import LOW_PRECISION, TOL, assert_close, d64, naive_fm_loss, naive_fm_path, naive_norm_modulate

HAS_GPU = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def needs_kernel(*names):
    missing = [n for n in names if not _ext.has_kernel(n, "cuda")]
    return pytest.mark.skipif(bool(missing), reason=f"extension has no CUDA kernel for {missing}")


def needs_backend(op):
    if "cuda" not in backends_for(op):
        pytest.skip(f"{op} has no registered cuda backend yet")


def tol(dtype, scale=1.0):
    rtol, atol = TOL[dtype] if dtype in TOL else (1e-12, 1e-12)
    return dict(rtol=rtol * scale, atol=atol * scale)


def rel_close(actual, expected, dtype, name=""):
    """Relative to the largest expected magnitude: dv of a mean is ~1 / numel, far below any atol."""
    rtol, _ = TOL[dtype] if dtype in TOL else (1e-12, 0.0)
    expected = expected.detach().double()
    atol = rtol * float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual.detach().double(), expected, rtol=rtol, atol=atol,
                               msg=lambda m: f"{name}: {m}")


def randn(shape, dtype=torch.float32, scale=1.0, shift=0.0):
    return (torch.randn(shape, device=DEV) * scale + shift).to(dtype)


# Per-sample shapes (B, ...): B in 1, 3, 123; trailing sizes 1, 7, 127, 300 and multi-axis.
ROW_SHAPES = [(1, 1), (3, 7), (123, 127), (1, 300), (3, 3, 300), (123, 1, 7), (2, 3, 5000)]


# ----------------------------------------------------------------------------- fm_interpolate


@needs_kernel("fm_interpolate", "fm_interpolate_backward")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("sigma_min", [0.0, 0.1])
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=str)
def test_fm_interpolate_op(shape, sigma_min, dtype):
    torch.manual_seed(0)
    x0, x1 = randn(shape, dtype), randn(shape, dtype, 2.0, 1.0)
    t = torch.rand(shape[0], device=DEV)
    x_t, u_t = torch.ops.flowfm.fm_interpolate(x0, x1, t, sigma_min)
    assert x_t.dtype == dtype and u_t.dtype == dtype and x_t.shape == shape
    want_xt, want_ut = naive_fm_path(x0, x1, t, sigma_min)
    torch.testing.assert_close(x_t.double(), want_xt, **tol(dtype))
    torch.testing.assert_close(u_t.double(), want_ut, **tol(dtype))

    # Backward against float64 autograd of the naive path, with either upstream gradient absent.
    g_x, g_u = randn(shape, dtype), randn(shape, dtype)
    for dx_t, du_t in ((g_x, g_u), (g_x, None), (None, g_u)):
        a0, a1, at = d64(x0, True), d64(x1, True), d64(t, True)
        xt64, ut64 = naive_fm_path(a0, a1, at, sigma_min)
        out = sum((o * g.double()).sum() for o, g in ((xt64, dx_t), (ut64, du_t)) if g is not None)
        want = torch.autograd.grad(out, (a0, a1, at), allow_unused=True)
        got = torch.ops.flowfm.fm_interpolate_backward(dx_t, du_t, x0, x1, t, sigma_min)
        for name, a, b, like in zip(("dx0", "dx1", "dt"), got, want, (x0, x1, t)):
            assert a.dtype == like.dtype and a.shape == like.shape, name
            b = torch.zeros_like(a, dtype=torch.float64) if b is None else b
            # dt sums n products of inputs rounded to dtype: scale the tolerance with the row size.
            scale = 1.0 if name != "dt" else max(1.0, (x1[0].numel() ** 0.5) / 4)
            torch.testing.assert_close(a.double(), b, **tol(dtype if name != "dt" else torch.float32, scale),
                                       msg=lambda m: f"{name}: {m}")


@needs_kernel("fm_interpolate")
def test_fm_interpolate_public_api_autograd():
    needs_backend("fm_interpolate")
    torch.manual_seed(1)
    x0, x1 = randn((123, 3, 300)), randn((123, 3, 300))
    t = torch.rand(123, device=DEV)
    ins = [v.clone().requires_grad_(True) for v in (x0, x1, t)]
    with use_backend("cuda"):
        x_t, u_t = ops.fm_interpolate(*ins, sigma_min=0.05)
    ref = [v.clone().requires_grad_(True) for v in (x0, x1, t)]
    with use_backend("torch"):
        rx, ru = ops.fm_interpolate(*ref, sigma_min=0.05)
    torch.testing.assert_close(x_t, rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(u_t, ru, rtol=1e-5, atol=1e-5)
    g = randn(x_t.shape)
    got = torch.autograd.grad((x_t * g).sum() + u_t.square().sum(), ins)
    want = torch.autograd.grad((rx * g).sum() + ru.square().sum(), ref)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- fm_loss


def _naive_loss_grads(v, x0, x1, w, sigma_min):
    v64 = d64(v, True)
    loss = naive_fm_loss(v64, x0, x1, w, sigma_min)
    diff = v64.detach() - (x1.double() - (1.0 - sigma_min) * x0.double())
    per = diff.square().reshape(v.shape[0], -1).mean(1)  # unweighted, as the CPU kernel returns it
    return loss, per, torch.autograd.grad(loss, v64)[0]


@needs_kernel("fm_loss")
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("sigma_min", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=str)
def test_fm_loss_op(shape, dtype, sigma_min, weighted):
    torch.manual_seed(2)
    v, x0, x1 = randn(shape, dtype), randn(shape, dtype), randn(shape, dtype, 2.0, 1.0)
    w = torch.rand(shape[0], device=DEV).to(dtype) * 2 if weighted else None
    loss, per_sample, dv = torch.ops.flowfm.fm_loss(v, x0, x1, w, sigma_min, True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.shape == () and per_sample.shape == (shape[0],) and dv.shape == shape
    assert loss.dtype == per_sample.dtype == dv.dtype == acc
    want_loss, want_per, want_dv = _naive_loss_grads(v, x0, x1, w, sigma_min)
    # The kernel computes in fp32 from the stored (possibly low-precision) values: fp32 tolerance.
    kdt = torch.float32 if dtype != torch.float64 else torch.float64
    rel_close(loss, want_loss, kdt, "loss")
    rel_close(per_sample, want_per, kdt, "per_sample")
    rel_close(dv, want_dv, kdt, "dv")
    loss2, per2, empty = torch.ops.flowfm.fm_loss(v, x0, x1, w, sigma_min, False)
    assert empty.numel() == 0
    assert torch.equal(loss2, loss) and torch.equal(per2, per_sample), "not deterministic / need_grad changed it"


@needs_kernel("fm_loss")
@pytest.mark.parametrize("vdtype", LOW_PRECISION, ids=str)
def test_fm_loss_autocast_pair(vdtype):
    """bf16/fp16 v against fp32 data runs without converting the data."""
    torch.manual_seed(3)
    shape = (123, 3, 300)
    v, x0, x1 = randn(shape, vdtype), randn(shape), randn(shape)
    loss, per_sample, dv = torch.ops.flowfm.fm_loss(v, x0, x1, None, 0.0, True)
    want_loss, want_per, want_dv = _naive_loss_grads(v, x0, x1, None, 0.0)
    assert dv.dtype == torch.float32
    rel_close(loss, want_loss, torch.float32, "loss")
    rel_close(per_sample, want_per, torch.float32, "per_sample")
    rel_close(dv, want_dv, torch.float32, "dv")


@needs_kernel("fm_loss")
def test_fm_loss_public_api_autograd():
    needs_backend("fm_loss")
    torch.manual_seed(4)
    shape = (123, 3, 300)
    v, x0, x1, w = randn(shape), randn(shape), randn(shape), torch.rand(123, device=DEV)
    t = torch.rand(123, device=DEV)
    vc, vr = v.clone().requires_grad_(True), v.clone().requires_grad_(True)
    with use_backend("cuda"):
        loss = ops.fm_loss(vc, x0, x1, t, weight=w, sigma_min=0.1)
    with use_backend("torch"):
        ref = ops.fm_loss(vr, x0, x1, t, weight=w, sigma_min=0.1)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    (3.0 * loss).backward()
    (3.0 * ref).backward()
    rel_close(vc.grad, vr.grad, torch.float32, "dv")


# ----------------------------------------------------------------------------- integrator updates


@needs_kernel("euler_step_")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("shape", [(1,), (3, 7), (123, 3, 300)], ids=str)
def test_euler_step_op(shape, dtype):
    torch.manual_seed(5)
    x, v = randn(shape, dtype), randn(shape, dtype)
    want = x.double() + 0.1 * v.double()
    ptr = x.data_ptr()
    torch.ops.flowfm.euler_step_(x, v, 0.1)
    assert x.data_ptr() == ptr
    torch.testing.assert_close(x.double(), want, **tol(dtype))
    # Non-contiguous target: updated in place through its view.
    base = randn((7, 6), dtype)
    view = base.t()
    vv = randn(view.shape, dtype)
    want = view.double() + 0.5 * vv.double()
    torch.ops.flowfm.euler_step_(view, vv, 0.5)
    torch.testing.assert_close(base.t().double(), want, **tol(dtype))
    # A v of another dtype is promoted, not rounded to x's dtype first.
    x, v32 = randn(shape, dtype), randn(shape, torch.float64)
    want = x.double() + 0.1 * v32.to(torch.float32 if dtype != torch.float64 else dtype).double()
    torch.ops.flowfm.euler_step_(x, v32, 0.1)
    torch.testing.assert_close(x.double(), want, **tol(dtype))


@needs_kernel("rk_combine")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("stages", [1, 2, 4, 8, 9, 13])
def test_rk_combine_op(stages, dtype):
    torch.manual_seed(6)
    shape = (3, 3, 301)
    x = randn(shape, dtype)
    ks = [randn(shape, dtype) for _ in range(stages)]
    bs = [float(b) for b in torch.rand(stages) - 0.3]
    bs[0] = 0.0 if stages > 1 else bs[0]  # a zero coefficient is skipped, not multiplied
    ks[0] = ks[0].fill_(float("inf")) if stages > 1 else ks[0]
    dt = 0.25
    want = x.double() + sum(dt * b * k.double() for b, k in zip(bs, ks) if b != 0.0)
    out = torch.empty_like(x)
    torch.ops.flowfm.rk_combine(out, x, ks, bs, dt)
    torch.testing.assert_close(out.double(), want, **tol(dtype, 2.0))
    # out aliasing x (the solver's final update), and out aliasing the last stage (past 8 stages
    # the binding must then go through a temporary).
    xa = x.clone()
    torch.ops.flowfm.rk_combine(xa, xa, ks, bs, dt)
    torch.testing.assert_close(xa.double(), want, **tol(dtype, 2.0))
    last = ks[-1].clone()
    torch.ops.flowfm.rk_combine(last, x, ks[:-1] + [last], bs, dt)
    torch.testing.assert_close(last.double(), want, **tol(dtype, 2.0))


@needs_kernel("rk_combine")
def test_rk_combine_non_contiguous_and_other_dtype_out():
    torch.manual_seed(7)
    x = randn((5, 8))
    ks = [randn((5, 8)) for _ in range(3)]
    bs = [0.5, -1.0, 2.0]
    want = x.double() + 0.1 * sum(b * k.double() for b, k in zip(bs, ks))
    out = torch.empty(8, 5, device=DEV).t()
    torch.ops.flowfm.rk_combine(out, x, ks, bs, 0.1)
    torch.testing.assert_close(out.double(), want, **tol(torch.float32))
    out64 = torch.empty(5, 8, device=DEV, dtype=torch.float64)
    torch.ops.flowfm.rk_combine(out64, x, ks, bs, 0.1)
    torch.testing.assert_close(out64, want, **tol(torch.float32))


@needs_kernel("euler_step_", "rk_combine")
def test_integrator_public_api():
    for op in ("euler_step_", "rk_combine"):
        needs_backend(op)
    torch.manual_seed(8)
    x, v = randn((123, 3, 300)), randn((123, 3, 300))
    with use_backend("cuda"):
        got = ops.rk_combine(x, 0.1, [v, x], [0.5, 0.5])
        xe = x.clone()
        ops.euler_step_(xe, v, 0.1)
    with use_backend("torch"):
        want = ops.rk_combine(x, 0.1, [v, x], [0.5, 0.5])
        xr = x.clone()
        ops.euler_step_(xr, v, 0.1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xe, xr, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- norm_modulate

ACTS = [None, "silu", "gelu_tanh"]
# (kind, x shape, num_groups): rows 1, 3, 123; D = 1, 7, 127, 300; GroupNorm with 1..C groups.
NORM_CASES = [("layer", (1, 1), 1), ("layer", (3, 7), 1), ("layer", (123, 127), 1), ("layer", (3, 123, 300), 1),
              ("layer", (1, 3, 7), 1), ("rms", (123, 300), 1), ("rms", (3, 5, 127), 1), ("rms", (1, 1, 1), 1),
              ("group", (1, 1, 7), 1), ("group", (3, 6, 1), 3), ("group", (3, 12, 127), 4),
              ("group", (3, 7, 300), 7), ("group", (2, 32, 5), 32), ("group", (123, 8, 30), 2)]


def norm_inputs(shape, kind, dtype=torch.float32, seed=0, modulate=True, affine=True):
    torch.manual_seed(seed)
    feat = shape[1] if kind == "group" else shape[-1]
    x = randn(shape, dtype, 2.0, 0.5)
    shift = randn((shape[0], feat), dtype, 0.5) if modulate else None
    scale = randn((shape[0], feat), dtype, 0.5) if modulate else None
    weight = randn((feat,), dtype, 0.3, 1.0) if affine else None
    bias = randn((feat,), dtype, 0.3) if affine else None
    return x, shift, scale, weight, bias


def group_tol_scale(x, kind, shape, groups, eps):
    """Single-element groups have variance 0: y = (x - mean) * rsqrt(eps) is an fp32 cancellation."""
    if kind == "group" and (shape[1] // groups) * shape[2] == 1:
        return 1.0 + float(x.abs().max()) / eps ** 0.5 * 2.0 ** -23 / 1e-5 * 4
    return 1.0


@needs_kernel("norm_modulate", "norm_modulate_backward")
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("kind,shape,groups", NORM_CASES, ids=str)
def test_norm_modulate_fp32_forward_and_grads(kind, shape, groups, act):
    eps = 1e-5
    raw = norm_inputs(shape, kind, seed=9)
    ins = [t.clone().requires_grad_(True) for t in raw]
    y, mean, rstd = torch.ops.flowfm.norm_modulate(*ins, kind, eps, act or "none", groups)
    stats = (shape[0], groups) if kind == "group" else (raw[0].numel() // shape[-1],)
    assert y.dtype == torch.float32 and mean.shape == stats and rstd.shape == stats
    ins64 = [d64(t, True) for t in raw]
    y64 = naive_norm_modulate(*ins64[:3], kind, ins64[3], ins64[4], eps, act, groups)
    assert_close(y, y64, torch.float32, scale=group_tol_scale(raw[0], kind, shape, groups, eps))

    g = randn(shape)
    got = torch.ops.flowfm.norm_modulate_backward(g, raw[0], mean, rstd, *raw[1:], kind, act or "none", groups)
    want = torch.autograd.grad(y64, ins64, grad_outputs=g.double())
    for name, a, b in zip(("x", "shift", "scale", "weight", "bias"), got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda m: f"grad {name}: {m}")


@needs_kernel("norm_modulate", "norm_modulate_backward")
@pytest.mark.parametrize("modulate,affine", [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("kind,shape", [("layer", (3, 7, 127)), ("rms", (123, 7)), ("group", (3, 6, 11))])
def test_norm_modulate_absent_optionals(kind, shape, modulate, affine):
    raw = norm_inputs(shape, kind, seed=10, modulate=modulate, affine=affine)
    y, mean, rstd = torch.ops.flowfm.norm_modulate(*raw, kind, 1e-6, "silu", 3)
    assert_close(y, naive_norm_modulate(*raw[:3], kind, raw[3], raw[4], 1e-6, "silu", 3), torch.float32)
    g = randn(shape)
    grads = torch.ops.flowfm.norm_modulate_backward(g, raw[0], mean, rstd, *raw[1:], kind, "silu", 3)
    for given, grad in zip(raw[1:], grads[1:]):
        assert (grad.numel() == 0) == (given is None)
        assert grad.device == raw[0].device


@needs_kernel("norm_modulate", "norm_modulate_backward")
@pytest.mark.parametrize("dtype", [*LOW_PRECISION, torch.float64], ids=str)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("kind,shape,groups", [("layer", (3, 7, 127), 1), ("rms", (123, 300), 1),
                                               ("group", (3, 12, 127), 3)], ids=str)
def test_norm_modulate_other_dtypes(kind, shape, groups, act, dtype):
    raw = norm_inputs(shape, kind, dtype=dtype, seed=11)
    y, mean, rstd = torch.ops.flowfm.norm_modulate(*raw, kind, 1e-6, act or "none", groups)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert y.dtype == dtype and mean.dtype == acc and rstd.dtype == acc
    expected = naive_norm_modulate(*raw[:3], kind, raw[3], raw[4], 1e-6, act, groups)
    if dtype == torch.float64:
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    else:
        assert_close(y, expected, dtype)
    g = randn(shape, dtype)
    grads = torch.ops.flowfm.norm_modulate_backward(g, raw[0], mean, rstd, *raw[1:], kind, act or "none", groups)
    for grad, like in zip(grads, raw):
        assert grad.dtype == dtype and grad.shape == like.shape


@needs_kernel("norm_modulate", "norm_modulate_backward")
@pytest.mark.parametrize("kind,shape,groups", [("layer", (3, 123, 300), 1), ("rms", (123, 7), 1),
                                               ("group", (3, 12, 127), 4)], ids=str)
def test_norm_modulate_public_api_autograd(kind, shape, groups):
    """use_backend("cuda") against use_backend("torch"), forward and every gradient."""
    needs_backend("norm_modulate")
    raw = norm_inputs(shape, kind, seed=12)
    cu = [t.clone().requires_grad_(True) for t in raw]
    ref = [t.clone().requires_grad_(True) for t in raw]
    kw = dict(kind=kind, eps=1e-5, act="gelu_tanh", num_groups=groups)
    with use_backend("cuda"):
        y = ops.norm_modulate(cu[0], cu[1], cu[2], weight=cu[3], bias=cu[4], **kw)
    with use_backend("torch"):
        y_ref = ops.norm_modulate(ref[0], ref[1], ref[2], weight=ref[3], bias=ref[4], **kw)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = randn(shape)
    for name, a, b in zip(("x", "shift", "scale", "weight", "bias"), torch.autograd.grad(y, cu, g),
                          torch.autograd.grad(y_ref, ref, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"grad {name}: {m}")


@needs_kernel("norm_modulate", "norm_modulate_backward")
def test_norm_modulate_deterministic_and_non_contiguous():
    raw = norm_inputs((64, 30, 384), "layer", seed=13)
    g = randn(raw[0].shape)
    outs = []
    for _ in range(2):
        y, mean, rstd = torch.ops.flowfm.norm_modulate(*raw, "layer", 1e-6, "silu", 1)
        outs.append((y, *torch.ops.flowfm.norm_modulate_backward(g, raw[0], mean, rstd, *raw[1:], "layer", "silu", 1)))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    xt = raw[0].transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    assert not xt.is_contiguous()
    y2 = torch.ops.flowfm.norm_modulate(xt, *raw[1:], "layer", 1e-6, "silu", 1)[0]
    assert torch.equal(y2, outs[0][0])


# ----------------------------------------------------------------------------- input checks


@needs_kernel("fm_loss", "norm_modulate")
def test_bindings_name_the_argument():
    x = randn((3, 7))
    with pytest.raises(ValueError, match="x0 must have shape"):
        torch.ops.flowfm.fm_loss(x, randn((3, 8)), x, None, 0.0, False)
    with pytest.raises(ValueError, match="weight"):
        torch.ops.flowfm.fm_loss(x, x, x, torch.ones(3), 0.0, False)  # CPU weight, CUDA v
    with pytest.raises(ValueError, match="shift must have shape"):
        torch.ops.flowfm.norm_modulate(x, randn((3, 6)), None, None, None, "layer", 1e-6, "none", 1)
    with pytest.raises(ValueError, match="act must be"):
        torch.ops.flowfm.norm_modulate(x, None, None, None, None, "layer", 1e-6, "relu", 1)
