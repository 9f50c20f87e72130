"""The C++ CPU backend beyond value parity (which every op test checks for each backend):
results independent of the thread count, torch.compile(fullgraph=True) through the custom ops,
and the kernels' own checks when ``torch.ops.flowfm`` is called directly with bad input."""
from __future__ import annotations

import pytest
import torch

from flowfm_fast import _backend, ops
from flowfm_fast.ops import _ext, use_backend

pytestmark = pytest.mark.skipif(not _ext.has_kernel("norm_modulate", "cpp"),
                                reason="flowfm_fast._C (cpp backend) is not built")


def _leaf(*shape, dtype=torch.float32, scale=1.0):
    return (scale * torch.randn(*shape)).to(dtype).requires_grad_(True)


def _run_all(dtype):
    """Forward and backward of every op on shapes big enough to be split across threads."""
    torch.manual_seed(0)
    B, T, D, C, L = 67, 13, 131, 16, 300
    x = _leaf(B, T, D, dtype=dtype)
    sh, sc, g = _leaf(B, D, scale=0.3), _leaf(B, D, scale=0.3), _leaf(B, D, scale=0.3)
    w, b = _leaf(D), _leaf(D)
    feat = _leaf(B, C, L, dtype=dtype)
    gsh, gsc, gw, gb = _leaf(B, C, scale=0.3), _leaf(B, C, scale=0.3), _leaf(C), _leaf(C)
    h = _leaf(B, T, D, dtype=dtype)
    x0, x1, v = torch.randn(B, 3, 3001).to(dtype), torch.randn(B, 3, 3001).to(dtype), _leaf(B, 3, 3001, dtype=dtype)
    t = torch.rand(B, requires_grad=True)
    lw, lb = _leaf(512, D, dtype=dtype, scale=0.1), _leaf(512, dtype=dtype)  # B T x 512 x D: oneDNN's size
    bw, bb = _leaf(C), _leaf(C)
    rm, rv = torch.zeros(C), torch.ones(C)
    outs = [
        ops.attention(*x.reshape(B, T, 1, D).expand(B, T, 3, D).permute(2, 0, 1, 3).unsqueeze(2)),
        ops.linear_act(x, lw, lb, "gelu_tanh"),
        ops.batch_norm_act(feat, rm, rv, bw, bb, True, 0.1, 1e-5, "relu"),
        rm.clone(), rv.clone(),
        ops.norm_modulate(x, sh, sc, "layer", w, b, act="silu"),
        ops.norm_modulate(x, sh, sc, "rms", w, None, act="gelu_tanh"),
        ops.norm_modulate(feat, gsh, gsc, "group", gw, gb, act="silu", num_groups=4),
        ops.gated_residual(x, h, g),
        *ops.gated_residual_norm_modulate(x, h, g, sh, sc, "layer", w, b),
        *ops.fm_interpolate(x0, x1, t, 0.01),
        ops.timestep_embedding(t * 1000, 129),
    ]
    fm = ops.fm_loss(v, x0, x1, t)
    # torch's own sum may depend on the thread count; only its gradient (the ramp) reaches our kernels.
    loss = fm + sum((o.float() * torch.linspace(-1, 1, o.shape[-1])).sum() for o in outs)
    leaves = [x, sh, sc, g, w, b, feat, gsh, gsc, gw, gb, h, v, t, lw, lb, bw, bb]
    grads = torch.autograd.grad(loss, leaves)
    with torch.no_grad():
        y = x.detach().clone()
        ops.euler_step_(y, h.detach(), 0.1)
        z = ops.rk_combine(y, 0.25, [h.detach(), x.detach(), y, h.detach()], [1 / 8, 3 / 8, 3 / 8, 1 / 8])
    return [o.detach() for o in outs] + [fm.detach(), y, z] + list(grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_thread_count_does_not_change_results(dtype):
    """Reductions use fixed blocks, never per-thread partial sums: 1 and 2 threads agree bit for bit."""
    n = torch.get_num_threads()
    try:
        with use_backend("cpp"):
            torch.set_num_threads(1)
            one = _run_all(dtype)
            torch.set_num_threads(2)
            two = _run_all(dtype)
    finally:
        torch.set_num_threads(n)
    assert len(one) == len(two)
    for i, (a, b) in enumerate(zip(one, two)):
        assert torch.equal(a, b), f"result {i} differs between 1 and 2 threads"


def test_cpp_is_the_default_on_cpu():
    from flowfm_fast.ops import _registry
    x = torch.randn(2, 3, 4)
    for op in ("norm_modulate", "gated_residual", "fm_loss", "fm_interpolate", "timestep_embedding", "linear_act",
               "attention", "batch_norm_act"):
        assert "cpp" in ops.backends_for(op)
        flags = (True, False) if op == "attention" else ()
        if _registry.impl_for(op, "cpp").rank("cpu", _backend.cpu_capability()) > 0:
            assert _registry.select(op, x.device, flags) is _registry.impl_for(op, "cpp"), op
        else:  # measured slower than the reference on this CPU capability: the reference runs
            assert _registry.select(op, x.device, flags) is _registry.impl_for(op, "torch"), op


def _block(x, c, w, b, v, x0, x1, t):
    shift, scale, gate = c.chunk(3, dim=1)
    h = ops.norm_modulate(x, shift, scale, "layer", w, b, act="silu")
    res, h2 = ops.gated_residual_norm_modulate(x, h, gate, shift, scale, "rms")
    return ops.fm_loss(v + h2.mean(), x0, x1, t) + res.square().mean()


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(1)
    B, T, D = 3, 5, 7
    args = [torch.randn(B, T, D, requires_grad=True), torch.randn(B, 3 * D, requires_grad=True),
            torch.randn(D, requires_grad=True), torch.randn(D, requires_grad=True),
            torch.randn(B, T, D, requires_grad=True), torch.randn(B, T, D), torch.randn(B, T, D), torch.rand(B)]
    with use_backend("cpp"):
        eager = _block(*args)
        g_eager = torch.autograd.grad(eager, [a for a in args if a.requires_grad])
        # Dispatch happens outside the graph: the custom ops are what the compiler sees, opaquely.
        compiled = torch.compile(_block, fullgraph=True, backend="aot_eager")
        out = compiled(*args)
        g_out = torch.autograd.grad(out, [a for a in args if a.requires_grad])
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_out, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _path_and_embedding(t, x0, x1):
    emb = ops.timestep_embedding(t, 16)
    x_t, u_t = ops.fm_interpolate(x0, x1, t, 0.1)
    return emb.square().sum() + (x_t * u_t).sum()


def test_torch_compile_fullgraph_path_and_embedding():
    """The C++ autograd of fm_interpolate and timestep_embedding traces under AOTAutograd too, and
    every gradient (t through both ops) matches eager."""
    torch.manual_seed(2)
    args = [torch.rand(4, requires_grad=True), torch.randn(4, 3, 5, requires_grad=True),
            torch.randn(4, 3, 5, requires_grad=True)]
    with use_backend("cpp"):
        eager = _path_and_embedding(*args)
        g_eager = torch.autograd.grad(eager, args)
        out = torch.compile(_path_and_embedding, fullgraph=True, backend="aot_eager")(*args)
        g_out = torch.autograd.grad(out, args)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_out, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("call,exc", [
    (lambda: torch.ops.flowfm.gated_residual(torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.randn(2, 4)),
     ValueError),
    (lambda: torch.ops.flowfm.norm_modulate(torch.randn(2, 6, 5), None, None, None, None, "group", 1e-5, "none", 4),
     ValueError),
    (lambda: torch.ops.flowfm.norm_modulate(torch.randn(2, 5), None, None, None, None, "cube", 1e-5, "none", 1),
     ValueError),
    (lambda: torch.ops.flowfm.norm_modulate(torch.randn(2, 5), torch.randn(2, 4), None, None, None, "layer", 1e-5,
                                            "none", 1), ValueError),
    (lambda: torch.ops.flowfm.fm_loss(torch.randn(2, 3), torch.randn(2, 3), torch.randn(3, 3), None, 0.0, False),
     ValueError),
    (lambda: torch.ops.flowfm.fm_interpolate(torch.randn(2, 3), torch.randn(2, 3), torch.rand(3), 0.0), ValueError),
    (lambda: torch.ops.flowfm.rk_combine(torch.empty(2, 3), torch.randn(2, 3), [torch.randn(2, 4)], [1.0], 0.1),
     ValueError),
    (lambda: torch.ops.flowfm.euler_step_(torch.zeros(2, 3, dtype=torch.int32), torch.randn(2, 3), 0.1), TypeError),
    (lambda: torch.ops.flowfm.timestep_embedding(torch.rand(2, 2), 8, 10000.0), ValueError),
])
def test_direct_calls_check_their_inputs(call, exc):
    """Python validates first; the kernels still refuse what would read out of bounds."""
    with pytest.raises(exc):
        call()


def test_torch_func_transforms_fall_back_to_the_reference():
    """C++ autograd functions refuse torch.func transforms: inside one the dispatch skips the
    compiled backends (same values as autograd outside), and forcing cpp there is a clear error."""
    torch.manual_seed(3)
    x0, x1, t = torch.randn(4, 3, 5), torch.randn(4, 3, 5), torch.rand(4)
    v = torch.randn(4, 3, 5)

    def loss(v):
        return ops.fm_loss(v, x0, x1, t)

    g_func = torch.func.grad(loss)(v)
    vl = v.clone().requires_grad_(True)
    g_autograd = torch.autograd.grad(loss(vl), vl)[0]   # outside the transform: the cpp kernels
    torch.testing.assert_close(g_func, g_autograd, rtol=1e-5, atol=1e-6)
    xs, mods = torch.randn(3, 2, 5, 16), torch.randn(3, 2, 16)
    batched = torch.vmap(lambda x, m: ops.norm_modulate(x, m, m, "layer"))(xs, mods)
    looped = torch.stack([ops.norm_modulate(x, m, m, "layer") for x, m in zip(xs, mods)])
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-5)
    with use_backend("cpp"), pytest.raises(RuntimeError, match="cpp.*fm_loss"):
        torch.func.grad(loss)(v)
