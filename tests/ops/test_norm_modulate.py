"""norm_modulate against hand-computed layer / rms / group norms in float64."""
from __future__ import annotations

import pytest
import torch

from flowfm_fast.ops import norm_modulate, use_backend
from naive import (LOW_PRECISION, assert_close, assert_float64_precision, backend_params,
                   d64, naive_norm_modulate)

OP = "norm_modulate"
ACTS = [None, "silu", "gelu_tanh"]
TOKEN_KINDS = ["layer", "rms"]
# x shapes for layer / rms: rows (N, D) and tokens (B, T, D); odd and prime sizes.
TOKEN_SHAPES = [(1, 1), (3, 7), (123, 127), (1, 300), (3, 5, 7), (1, 123, 1), (3, 7, 300), (2, 123, 127)]
# (B, C, L, num_groups) for group norm; num_groups divides C, including 1 and C.
GROUP_CASES = [(1, 1, 7, 1), (3, 6, 1, 1), (3, 6, 1, 2), (3, 6, 1, 3), (3, 6, 1, 6),
               (2, 12, 127, 1), (2, 12, 127, 4), (2, 12, 127, 12), (3, 7, 300, 7), (1, 32, 5, 32)]


@pytest.fixture(params=backend_params(OP))
def backend(request):
    with use_backend(request.param):
        yield request.param


def mod_shape(x, kind):
    return (x.shape[0], x.shape[1]) if kind == "group" else (x.shape[0], x.shape[-1])


def make_inputs(shape, kind, dtype=torch.float32, seed=0, modulate=True, affine=True):
    torch.manual_seed(seed)
    x = (torch.randn(shape) * 2.0 + 0.5).to(dtype)
    feat = shape[1] if kind == "group" else shape[-1]
    ms = (shape[0], feat)
    shift = (torch.randn(ms) * 0.5).to(dtype) if modulate else None
    scale = (torch.randn(ms) * 0.5).to(dtype) if modulate else None
    weight = (1.0 + 0.3 * torch.randn(feat)).to(dtype) if affine else None
    bias = (0.3 * torch.randn(feat)).to(dtype) if affine else None
    return x, shift, scale, weight, bias


# ----------------------------------------------------------------------------- forward values


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("kind", TOKEN_KINDS)
@pytest.mark.parametrize("shape", TOKEN_SHAPES, ids=str)
def test_token_kinds_fp32_match_naive(backend, shape, kind, act):
    x, shift, scale, weight, bias = make_inputs(shape, kind)
    y = norm_modulate(x, shift, scale, kind=kind, weight=weight, bias=bias, eps=1e-6, act=act)
    expected = naive_norm_modulate(x, shift, scale, kind, weight, bias, 1e-6, act)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert_close(y, expected, torch.float32)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("case", GROUP_CASES, ids=str)
def test_group_fp32_matches_naive(backend, case, act):
    b, c, l, g = case
    x, shift, scale, weight, bias = make_inputs((b, c, l), "group")
    y = norm_modulate(x, shift, scale, kind="group", weight=weight, bias=bias, eps=1e-5, act=act,
                      num_groups=g)
    expected = naive_norm_modulate(x, shift, scale, "group", weight, bias, 1e-5, act, g)
    assert y.dtype == torch.float32 and y.shape == x.shape
    tol_scale = 1.0
    if (c // g) * l == 1:
        # Single-element groups: variance 0, so y = (x - mean) * rsqrt(eps) is an exact 0 that an
        # fp32 kernel computes as x * rstd - mean * rstd: cancellation of ~ulp(|x| / sqrt(eps)).
        tol_scale = 1.0 + float(x.abs().max()) / 1e-5 ** 0.5 * 2.0 ** -23 / 1e-5 * 4
    assert_close(y, expected, torch.float32, scale=tol_scale)


@pytest.mark.parametrize("modulate,affine", [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("kind,shape", [("layer", (3, 7, 127)), ("rms", (123, 7)), ("group", (3, 6, 11))])
def test_optional_args_none(backend, kind, shape, modulate, affine):
    """shift/scale None is a plain norm; weight/bias None is no affine."""
    x, shift, scale, weight, bias = make_inputs(shape, kind, modulate=modulate, affine=affine)
    kw = dict(kind=kind, weight=weight, bias=bias, eps=1e-6, num_groups=3)
    y = norm_modulate(x, shift, scale, **kw)
    expected = naive_norm_modulate(x, shift, scale, kind, weight, bias, 1e-6, None, 3)
    assert_close(y, expected, torch.float32)
    if not modulate:
        zeros = torch.zeros(mod_shape(x, kind))
        y0 = norm_modulate(x, zeros, zeros, **kw)
        torch.testing.assert_close(y, y0, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["layer", "rms", "group"])
def test_plain_norm_statistics(backend, kind):
    """Without affine and modulation a layer/group norm has zero mean, unit variance per row/group."""
    torch.manual_seed(1)
    x = torch.randn(3, 8, 127) * 3.0 + 2.0
    y = norm_modulate(x, kind=kind, eps=1e-12, num_groups=4).double()
    if kind == "layer":
        stats = y
        dims = -1
    elif kind == "group":
        stats = y.reshape(3, 4, 2 * 127)
        dims = -1
    else:
        rms = (y * y).mean(-1)
        torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-5, atol=1e-5)
        return
    torch.testing.assert_close(stats.mean(dims), torch.zeros(stats.shape[:-1], dtype=torch.float64),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(stats.var(dims, unbiased=False),
                               torch.ones(stats.shape[:-1], dtype=torch.float64), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_affine_applied_before_modulation(backend, kind):
    """(n * w + b) * (1 + scale) + shift, not (n * (1 + scale) + shift) * w + b."""
    torch.manual_seed(2)
    x = torch.randn(5, 7)
    shift, scale = torch.randn(5, 7), torch.randn(5, 7)
    w, b = torch.randn(7), torch.randn(7)
    plain = naive_norm_modulate(x, kind=kind, eps=1e-6)
    right = (plain * w.double() + b.double()) * (1 + scale.double()) + shift.double()
    wrong = (plain * (1 + scale.double()) + shift.double()) * w.double() + b.double()
    y = norm_modulate(x, shift, scale, kind=kind, weight=w, bias=b, eps=1e-6)
    assert_close(y, right, torch.float32)
    assert not torch.allclose(y.double(), wrong, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("kind", TOKEN_KINDS)
def test_token_broadcast_over_t_matches_rows(backend, kind, act):
    """(B, T, D) with (B, D) modulation == each token row t run as (B, D) rows with (B, D)."""
    x, shift, scale, weight, bias = make_inputs((3, 11, 7), kind, seed=3)
    y = norm_modulate(x, shift, scale, kind=kind, weight=weight, bias=bias, act=act)
    for t in range(x.shape[1]):
        yt = norm_modulate(x[:, t, :].contiguous(), shift, scale, kind=kind, weight=weight, bias=bias, act=act)
        torch.testing.assert_close(y[:, t, :], yt, rtol=1e-6, atol=1e-6)


def test_group_broadcast_over_l_by_hand(backend):
    """Group modulation (B, C) applies the same shift/scale to every position l."""
    x, shift, scale, weight, bias = make_inputs((2, 6, 13), "group", seed=4)
    y = norm_modulate(x, shift, scale, kind="group", weight=weight, bias=bias, num_groups=3).double()
    plain = naive_norm_modulate(x, kind="group", weight=weight, bias=bias, num_groups=3, eps=1e-6)
    for b in range(2):
        for c in range(6):
            for l in range(13):
                want = plain[b, c, l] * (1 + float(scale[b, c])) + float(shift[b, c])
                assert abs(float(y[b, c, l]) - float(want)) <= 1e-5 + 1e-5 * abs(float(want))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("kind,shape", [("layer", (3, 7, 127)), ("layer", (123, 300)), ("rms", (3, 5, 300)),
                                        ("rms", (1, 7)), ("group", (3, 12, 127)), ("group", (1, 6, 7))])
def test_low_precision(backend, kind, shape, dtype, act):
    x, shift, scale, weight, bias = make_inputs(shape, kind, dtype=dtype, seed=5)
    y = norm_modulate(x, shift, scale, kind=kind, weight=weight, bias=bias, act=act, num_groups=3)
    assert y.dtype == dtype
    expected = naive_norm_modulate(x, shift, scale, kind, weight, bias, 1e-6, act, 3)
    assert_close(y, expected, dtype)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_x_with_fp32_params(backend, dtype):
    """Output dtype follows x, whatever the modulation and affine dtypes are."""
    x, shift, scale, weight, bias = make_inputs((3, 5, 7), "layer", seed=6)
    xl = x.to(dtype)
    y = norm_modulate(xl, shift, scale, kind="layer", weight=weight, bias=bias)
    assert y.dtype == dtype
    assert_close(y, naive_norm_modulate(xl, shift, scale, "layer", weight, bias), dtype)


@pytest.mark.parametrize("kind", ["layer", "rms", "group"])
def test_float64_full_precision(backend, kind):
    """float64 inputs must be computed in float64 (the docstring promises at least fp32 stats)."""
    x, shift, scale, weight, bias = make_inputs((3, 6, 7), kind, dtype=torch.float64, seed=7)
    y = norm_modulate(x, shift, scale, kind=kind, weight=weight, bias=bias, num_groups=3)
    assert y.dtype == torch.float64
    expected = naive_norm_modulate(x, shift, scale, kind, weight, bias, 1e-6, None, 3)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- non-contiguous


@pytest.mark.parametrize("kind", ["layer", "rms", "group"])
def test_non_contiguous_inputs(backend, kind):
    torch.manual_seed(8)
    b, t, d = 3, 7, 12
    # x is a transposed view; shift/scale transposed; weight/bias strided slices.
    x = torch.randn(b, d, t).transpose(1, 2) if kind != "group" else torch.randn(b, t, d).transpose(1, 2)
    feat = x.shape[1] if kind == "group" else x.shape[-1]
    shift = torch.randn(feat, b).t()
    scale = torch.randn(feat, b).t()
    weight = torch.randn(2 * feat)[::2]
    bias = torch.randn(feat, 2)[:, 1]
    for tensor in (x, shift, scale, weight, bias):
        assert not tensor.is_contiguous()
    kw = dict(kind=kind, act="silu", num_groups=4)
    y = norm_modulate(x, shift, scale, weight=weight, bias=bias, **kw)
    y_ref = norm_modulate(x.contiguous(), shift.contiguous(), scale.contiguous(),
                          weight=weight.contiguous(), bias=bias.contiguous(), **kw)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    assert_close(y, naive_norm_modulate(x, shift, scale, kind, weight, bias, 1e-6, "silu", 4), torch.float32)


# ----------------------------------------------------------------------------- gradients

GRAD_TOKEN_SHAPES = [(2, 3, 5), (3, 4)]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("kind,shape", [("layer", s) for s in GRAD_TOKEN_SHAPES]
                         + [("rms", s) for s in GRAD_TOKEN_SHAPES] + [("group", (2, 4, 3))])
def test_gradcheck_float64(backend, kind, shape, act):
    inputs = [d64(t, grad=True) for t in make_inputs(shape, kind, seed=9)]

    def fn(x, shift, scale, weight, bias):
        return norm_modulate(x, shift, scale, kind=kind, weight=weight, bias=bias, eps=1e-5, act=act,
                             num_groups=2)

    assert_float64_precision(fn(*inputs), naive_norm_modulate(*inputs[:3], kind, *inputs[3:], 1e-5, act, 2))
    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind,shape", [("layer", (2, 3, 5)), ("rms", (3, 4)), ("group", (2, 4, 3))])
def test_gradcheck_float64_plain_norm(backend, kind, shape):
    x = d64(make_inputs(shape, kind, seed=10)[0], grad=True)
    assert_float64_precision(norm_modulate(x, kind=kind, num_groups=2, eps=1e-5),
                             naive_norm_modulate(x, kind=kind, num_groups=2, eps=1e-5))
    assert torch.autograd.gradcheck(lambda x: norm_modulate(x, kind=kind, num_groups=2, eps=1e-5), (x,),
                                    eps=1e-6, atol=1e-6, rtol=1e-5)


def _grads(out, inputs, g):
    return torch.autograd.grad(out, [i for i in inputs if i is not None], grad_outputs=g)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("kind,shape,groups", [("layer", (3, 7, 127), 1), ("layer", (123, 7), 1),
                                               ("rms", (3, 5, 300), 1), ("rms", (1, 1), 1),
                                               ("group", (3, 12, 31), 4), ("group", (1, 7, 5), 7)])
def test_fp32_grads_match_naive_autograd(backend, kind, shape, groups, act):
    raw = make_inputs(shape, kind, seed=11)
    ins32 = [t.clone().requires_grad_(True) for t in raw]
    ins64 = [d64(t, grad=True) for t in raw]
    torch.manual_seed(12)
    g = torch.randn(shape)
    y = norm_modulate(*ins32[:3], kind=kind, weight=ins32[3], bias=ins32[4], eps=1e-5, act=act,
                      num_groups=groups)
    y64 = naive_norm_modulate(*ins64[:3], kind, ins64[3], ins64[4], 1e-5, act, groups)
    got = _grads(y, ins32, g)
    want = _grads(y64, ins64, g.double())
    for name, a, b in zip(("x", "shift", "scale", "weight", "bias"), got, want):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("kind", ["layer", "rms", "group"])
def test_fp32_grads_plain_norm(backend, kind):
    x = make_inputs((3, 6, 9), kind, seed=13)[0]
    x32, x64 = x.clone().requires_grad_(True), d64(x, grad=True)
    g = torch.randn(3, 6, 9)
    (gx,) = torch.autograd.grad(norm_modulate(x32, kind=kind, num_groups=2), x32, g)
    (gx64,) = torch.autograd.grad(naive_norm_modulate(x64, kind=kind, num_groups=2), x64, g.double())
    torch.testing.assert_close(gx.double(), gx64, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- validation


def _ok(kind="layer"):
    shape = (2, 6, 5)
    return make_inputs(shape, kind, seed=14)


@pytest.mark.parametrize("call,exc,match", [
    (lambda x, s, c, w, b: norm_modulate(x[0, 0], s, c), ValueError, "x must have 2 or 3"),
    (lambda x, s, c, w, b: norm_modulate(x[None], s, c), ValueError, "x must have 2 or 3"),
    (lambda x, s, c, w, b: norm_modulate(x[0], kind="group", num_groups=2), ValueError, "x must have 3"),
    (lambda x, s, c, w, b: norm_modulate(x.int(), s, c), TypeError, "x must be float"),
    (lambda x, s, c, w, b: norm_modulate(x.numpy(), s, c), TypeError, "x must be a torch.Tensor"),
    (lambda x, s, c, w, b: norm_modulate(x[:, :0], None, None), ValueError, "x must not be empty"),
    (lambda x, s, c, w, b: norm_modulate(x, s[:1], c), ValueError, "shift must have shape"),
    (lambda x, s, c, w, b: norm_modulate(x, s, c[:, :3]), ValueError, "scale must have shape"),
    (lambda x, s, c, w, b: norm_modulate(x, s[:, None], c), ValueError, "shift must have 2"),
    (lambda x, s, c, w, b: norm_modulate(x, s, c.long()), TypeError, "scale must be float"),
    (lambda x, s, c, w, b: norm_modulate(x, s[:0], c), ValueError, "shift"),
    (lambda x, s, c, w, b: norm_modulate(x, s, c, weight=w[:3]), ValueError, "weight must have shape"),
    (lambda x, s, c, w, b: norm_modulate(x, s, c, weight=w[None]), ValueError, "weight must have 1"),
    (lambda x, s, c, w, b: norm_modulate(x, s, c, bias=torch.zeros(6)), ValueError, "bias must have shape"),
    (lambda x, s, c, w, b: norm_modulate(x, s, c, bias=b.int()), TypeError, "bias must be float"),
    (lambda x, s, c, w, b: norm_modulate(x, s, c, kind="batch"), ValueError, "kind"),
    (lambda x, s, c, w, b: norm_modulate(x, s, c, act="relu"), ValueError, "act"),
    (lambda x, s, c, w, b: norm_modulate(x, s, c, eps=0.0), ValueError, "eps"),
    (lambda x, s, c, w, b: norm_modulate(x, s, c, eps=-1e-5), ValueError, "eps"),
    (lambda x, s, c, w, b: norm_modulate(x, s, c, eps=float("nan")), ValueError, "eps"),
    (lambda x, s, c, w, b: norm_modulate(x, s, c, eps="1e-5"), TypeError, "eps"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_validation_token(call, exc, match):
    x, s, c, w, b = _ok()
    with pytest.raises(exc, match=match):
        call(x, s, c, w, b)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_groups=4), ValueError, "num_groups"),     # 4 does not divide C=6
    (dict(num_groups=5), ValueError, "num_groups"),
    (dict(num_groups=0), ValueError, "num_groups"),
    (dict(num_groups=-2), ValueError, "num_groups"),
    (dict(num_groups=2.0), ValueError, "num_groups"),
    (dict(num_groups=True), ValueError, "num_groups"),
    (dict(num_groups=3, weight=torch.ones(5)), ValueError, "weight"),
    (dict(num_groups=3, bias=torch.ones(2, 3)), ValueError, "bias"),
    (dict(num_groups=3, shift=torch.ones(2, 5)), ValueError, "shift"),   # (B, L) instead of (B, C)
    (dict(num_groups=3, scale=torch.ones(2, 6, 5)), ValueError, "scale"),
])
def test_validation_group(kwargs, exc, match):
    x = _ok("group")[0]
    with pytest.raises(exc, match=match):
        norm_modulate(x, kind="group", **kwargs)


def test_modulation_shape_names_broadcast_rule():
    x = torch.randn(2, 5, 7)
    with pytest.raises(ValueError, match=r"shift must have shape \(2, 7\)"):
        norm_modulate(x, torch.randn(2, 5, 7)[:, 0, :3], None)
    # (B, T, D)-shaped modulation is not the broadcast form
    with pytest.raises(ValueError, match="scale must have 2 dimensions"):
        norm_modulate(x, None, torch.randn(2, 5, 7))
