"""batch_norm_act (``act(batch_norm(x))``) against hand-computed per-channel statistics in float64,
on every backend, and the BatchNorm1d module against torch.nn.BatchNorm1d."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from flowfm_fast import nn as fnn
from flowfm_fast import ops
from flowfm_fast.ops import batch_norm_act, use_backend
from naive import LOW_PRECISION, TOL, assert_float64_precision, backend_params, d64

OP = "batch_norm_act"
ACTS = [None, "relu"]
# (B, C) and (B, C, L): one sample with positions, one position per sample, odd and prime sizes,
# and the encoder's first activation (64, 32, 300).
SHAPES = [(2, 1), (5, 3), (1, 4, 5), (2, 3, 1), (7, 5, 11), (3, 7, 300), (64, 32, 300)]
MOMENTUM, EPS = 0.1, 1e-5


@pytest.fixture(params=backend_params(OP))
def backend(request):
    with use_backend(request.param):
        yield request.param


def naive(x, weight, bias, mean, var, act):
    """float64 normalisation with given per-channel mean / biased variance."""
    view = (1, -1) + (1,) * (x.dim() - 2)
    y = (x - mean.reshape(view)) / torch.sqrt(var.reshape(view) + EPS)
    if weight is not None:
        y = y * weight.reshape(view)
    if bias is not None:
        y = y + bias.reshape(view)
    return torch.relu(y) if act == "relu" else y


def batch_stats(x):
    dims = [0] + list(range(2, x.dim()))
    n = x.numel() // x.shape[1]
    mean = x.sum(dims) / n
    centred = x - mean.reshape((1, -1) + (1,) * (x.dim() - 2))
    sq = (centred * centred).sum(dims)
    return mean, sq / n, sq / max(n - 1, 1)


def make(shape, dtype=torch.float32, seed=0, affine=True):
    torch.manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape) * 1.5 + 0.3).to(dtype)
    w = (1.0 + 0.3 * torch.randn(c)) if affine else None
    b = (0.2 * torch.randn(c)) if affine else None
    rm, rv = 0.1 * torch.randn(c), 0.5 + torch.rand(c)
    return x, w, b, rm, rv


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp32_values_grads_and_running_stats(backend, shape, training, act):
    x, w, b, rm, rv = make(shape)
    rm0, rv0 = rm.clone(), rv.clone()
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
    y = batch_norm_act(leaves[0], rm, rv, leaves[1], leaves[2], training, MOMENTUM, EPS, act)
    gy = torch.randn(shape)
    grads = torch.autograd.grad(y, leaves, gy)

    leaves64 = [d64(t, grad=True) for t in (x, w, b)]
    if training:
        mean, var, var_unbiased = batch_stats(leaves64[0])
    else:
        mean, var = d64(rm0), d64(rv0)
    y64 = naive(leaves64[0], leaves64[1], leaves64[2], mean, var, act)
    grads64 = torch.autograd.grad(y64, leaves64, gy.double())
    assert y.dtype == torch.float32 and y.shape == shape
    n = x.numel() // shape[1]
    torch.testing.assert_close(y.double(), y64.detach(), rtol=1e-5, atol=1e-5)
    for name, g, g64 in zip(("dx", "dweight", "dbias"), grads, grads64):
        # dweight / dbias sum n products; dx of training mode subtracts means of them.
        scale = max(1.0, float(g64.abs().max())) * (n ** 0.5 / 4 if name != "dx" else 1.0)
        torch.testing.assert_close(g.double(), g64, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")
    if training:
        torch.testing.assert_close(rm.double(), (1 - MOMENTUM) * d64(rm0) + MOMENTUM * mean.detach(),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rv.double(), (1 - MOMENTUM) * d64(rv0) + MOMENTUM * var_unbiased.detach(),
                                   rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_low_precision(backend, dtype, training):
    x, w, b, rm, rv = make((7, 5, 33), dtype=dtype)
    rm0, rv0 = rm.clone(), rv.clone()
    y = batch_norm_act(x, rm, rv, w, b, training, MOMENTUM, EPS, "relu")
    mean, var, _ = batch_stats(d64(x)) if training else (d64(rm0), d64(rv0), None)
    assert y.dtype == dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y.double(), naive(d64(x), d64(w), d64(b), mean, var, "relu"),
                               rtol=rtol, atol=atol * 4)


def test_affine_absent_and_no_running_stats(backend):
    x, _, _, _, _ = make((6, 4, 9), affine=False)
    y = batch_norm_act(x, None, None, None, None, True, MOMENTUM, EPS, None)
    mean, var, _ = batch_stats(d64(x))
    torch.testing.assert_close(y.double(), naive(d64(x), None, None, mean, var, None), rtol=1e-5, atol=1e-5)


def test_non_contiguous_input(backend):
    x = make((9, 300, 6))[0]
    xt = x.transpose(1, 2)[:, :, ::2]  # (9, 6, 150), strided
    assert not xt.is_contiguous()
    y = batch_norm_act(xt, None, None, None, None, True, MOMENTUM, EPS, "relu")
    mean, var, _ = batch_stats(d64(xt))
    torch.testing.assert_close(y.double(), naive(d64(xt), None, None, mean, var, "relu"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", ACTS)
def test_float64_gradcheck(backend, training, act):
    torch.manual_seed(1)
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.3 * torch.randn(3, dtype=torch.float64)).requires_grad_(True)
    b = (0.2 * torch.randn(3, dtype=torch.float64)).requires_grad_(True)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)

    def fn(x, w, b):  # fresh running buffers each call: the gradient does not depend on them
        return batch_norm_act(x, rm.clone(), rv.clone(), w, b, training, MOMENTUM, EPS, act)

    mean, var, _ = batch_stats(x) if training else (rm, rv, None)
    assert_float64_precision(fn(x, w, b), naive(x, w, b, mean, var, act))
    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_torch_compile_fullgraph(backend):
    x, w, b, rm, rv = make((5, 4, 13))
    args = [x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True)]
    rm_e, rv_e, rm_c, rv_c = rm.clone(), rv.clone(), rm.clone(), rv.clone()

    def f(x, w, b, rm, rv):
        return batch_norm_act(x, rm, rv, w, b, True, MOMENTUM, EPS, "relu").square().mean()

    eager = f(*args, rm_e, rv_e)
    g_eager = torch.autograd.grad(eager, args)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(*args, rm_c, rv_c)
    g_out = torch.autograd.grad(out, args)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    for a, b_ in zip(g_out, g_eager):
        torch.testing.assert_close(a, b_, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rm_c, rm_e)  # the running update happened inside the graph too
    torch.testing.assert_close(rv_c, rv_e)


BAD = [
    (lambda x, rm, rv, w, b: batch_norm_act(x[:1, :, :1], rm, rv, w, b, True), ValueError, "more than 1 value"),
    (lambda x, rm, rv, w, b: batch_norm_act(x, None, None, w, b, False), ValueError, "running_mean"),
    (lambda x, rm, rv, w, b: batch_norm_act(x, rm, None, w, b, True), ValueError, "together"),
    (lambda x, rm, rv, w, b: batch_norm_act(x, rm[:-1], rv, w, b, True), ValueError, "running_mean must have shape"),
    (lambda x, rm, rv, w, b: batch_norm_act(x, rm, rv, w[:-1], b, True), ValueError, "weight must have shape"),
    (lambda x, rm, rv, w, b: batch_norm_act(x, rm, rv, w, b, True, act="silu"), ValueError, "act"),
    (lambda x, rm, rv, w, b: batch_norm_act(x, rm, rv, w, b, True, momentum=1.5), ValueError, "momentum"),
    (lambda x, rm, rv, w, b: batch_norm_act(x, rm, rv, w, b, True, eps=0.0), ValueError, "eps"),
    (lambda x, rm, rv, w, b: batch_norm_act(x, rm, rv, w, b, "yes"), TypeError, "training"),
    (lambda x, rm, rv, w, b: batch_norm_act(x[0, 0], rm, rv, w, b, True), ValueError, "x must have 2 or 3"),
    (lambda x, rm, rv, w, b: batch_norm_act(x.long(), rm, rv, w, b, True), TypeError, "x must be float32"),
    (lambda x, rm, rv, w, b: batch_norm_act(x, rm, rv, w.to("meta"), b, True), ValueError, "weight is on meta"),
]


@pytest.mark.parametrize("fn,exc,match", BAD)
def test_bad_inputs_raise_clear_errors(backend, fn, exc, match):
    x, w, b, rm, rv = make((3, 4, 5))
    with pytest.raises(exc, match=match):
        fn(x, rm, rv, w, b)


def test_kernel_checks_direct_calls():
    if "cpp" not in ops.backends_for(OP):
        pytest.skip("flowfm_fast._C is not built")
    x, w, b, rm, rv = make((3, 4, 5))
    with pytest.raises(ValueError, match="more than 1 value"):
        torch.ops.flowfm.batch_norm_act(x[:1, :, :1], w, b, rm, rv, True, EPS, "relu")
    with pytest.raises(ValueError, match="eval mode needs"):
        torch.ops.flowfm.batch_norm_act(x, w, b, None, None, False, EPS, "relu")
    with pytest.raises(ValueError, match="weight must have shape"):
        torch.ops.flowfm.batch_norm_act(x, w[:-1], b, rm, rv, True, EPS, "none")
    with pytest.raises(ValueError, match="act must be"):
        torch.ops.flowfm.batch_norm_act(x, w, b, rm, rv, True, EPS, "silu")


# ----------------------------------------------------------------------------- the module


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_module_matches_nn_batchnorm_then_relu(backend, momentum):
    torch.manual_seed(7)
    ref = nn.BatchNorm1d(6, momentum=momentum)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.2, 0.2)
    mod = fnn.BatchNorm1d(6, momentum=momentum, act="relu")
    mod.load_state_dict(ref.state_dict())
    for step in range(3):  # training steps update the running statistics identically
        x = torch.randn(8, 6, 17) * (1 + step)
        torch.testing.assert_close(mod(x), torch.relu(ref(x)), rtol=1e-5, atol=1e-5)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(mod.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    mod.eval(), ref.eval()
    x = torch.randn(3, 6, 5)
    torch.testing.assert_close(mod(x), torch.relu(ref(x)), rtol=1e-5, atol=1e-5)
    assert "act='relu'" in repr(mod)


def test_convert_swaps_batchnorm1d(backend):
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4))
    ref = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4))
    ref.load_state_dict(model.state_dict())
    fnn.convert(model)
    assert type(model[1]) is fnn.BatchNorm1d and model[1].act is None
    x = torch.randn(5, 2, 11)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_nan_propagates_through_the_relu(backend):
    x, w, b, rm, rv = make((4, 3, 7))
    x[0, 1, 2] = float("nan")
    y = batch_norm_act(x, None, None, w, b, True, MOMENTUM, EPS, "relu")
    assert torch.isnan(y[:, 1]).all()  # the channel's statistics are NaN: every value of it
    assert not torch.isnan(y[:, 0]).any()


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_grads(backend, dtype):
    x, w, b, rm, rv = make((7, 5, 33), dtype=dtype)
    leaf = x.clone().requires_grad_(True)
    gy = torch.randn(7, 5, 33).to(dtype)
    (g,) = torch.autograd.grad(batch_norm_act(leaf, rm, rv, w, b, True, MOMENTUM, EPS, "relu"), leaf, gy)
    leaf64 = d64(x, grad=True)
    mean, var, _ = batch_stats(leaf64)
    (g64,) = torch.autograd.grad(naive(leaf64, d64(w), d64(b), mean, var, "relu"), leaf64, gy.double())
    assert g.dtype == dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(g.double(), g64, rtol=rtol * 2, atol=atol * 4)


def test_empty_batch_takes_the_reference(backend):
    x = torch.randn(0, 3, 5)
    y = batch_norm_act(x, torch.zeros(3), torch.ones(3), None, None, False, MOMENTUM, EPS, "relu")
    assert y.shape == (0, 3, 5)
