"""The Triton backend of the flow-matching and integrator ops beyond value parity (which every op
test checks for each backend): multi-program grids and partial-sum tables, run-to-run identical
results, torch.compile(fullgraph=True) through the custom ops, and where the backend may run.

On a machine without a GPU these run under TRITON_INTERPRET=1 (tests/conftest.py sets it)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowfm_fast import _backend

from flowfm_fast import ops
from flowfm_fast.ops import _triton, use_backend
from naive import naive_fm_loss, naive_fm_path, naive_timestep_embedding

OPS = ("timestep_embedding", "fm_interpolate", "fm_loss", "euler_step_", "rk_combine")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(
    not (_triton.available() and (DEVICE == "cuda" or _backend.interpreting())),
    reason="triton is not installed, or no GPU and TRITON_INTERPRET is not 1")


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 64 elements: several programs along both axes, partial-sum tables with several
    columns, the backward's loop over frequency chunks, the reduction's loop over row blocks."""
    from flowfm_fast.kernels import _blocks
    monkeypatch.setattr(_blocks, "INTERPRETER_TILE", 64)
    monkeypatch.setattr(_blocks, "GPU_TILE", 64)


def _leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype).requires_grad_(True)


@pytest.mark.gpu_tensors
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_multi_program_grids_match_reference(small_tiles, dtype):
    torch.manual_seed(0)
    B, C, L = 67, 3, 37   # N = 111: two column blocks of 64; the loss reduction loops over rows
    x0, x1 = torch.randn(B, C, L).to(dtype), torch.randn(B, C, L).to(dtype)
    v, w = torch.randn(B, C, L).to(dtype), torch.rand(B)
    t = torch.rand(B)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    with use_backend("triton"):
        x_t, u_t = ops.fm_interpolate(x0, x1, t, 0.1)
        loss = ops.fm_loss(v, x0, x1, t, weight=w, sigma_min=0.1)
        emb = ops.timestep_embedding(t * 1000, 301)
        out = ops.rk_combine(x0, 0.3, [x1, v, x0, x1, v, x1], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
        y = x0.clone()
        ops.euler_step_(y, v, 0.25)
    e_xt, e_ut = naive_fm_path(x0, x1, t, 0.1)
    torch.testing.assert_close(x_t.double(), e_xt, **tol)
    torch.testing.assert_close(u_t.double(), e_ut, **tol)
    torch.testing.assert_close(loss.double(), naive_fm_loss(v, x0, x1, w, 0.1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(emb.double(), naive_timestep_embedding(t * 1000, 301), rtol=0, atol=5e-4)
    want = x0.double() + 0.3 * sum(b * k.double() for b, k in zip([0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                                                                     [x1, v, x0, x1, v, x1]))
    torch.testing.assert_close(out.double(), want, **tol)
    torch.testing.assert_close(y.double(), x0.double() + 0.25 * v.double(), **tol)


@pytest.mark.gpu_tensors
def test_multi_program_gradients_match_reference(small_tiles):
    torch.manual_seed(1)
    B, C, L = 67, 3, 37
    x0, x1, v = _leaf(B, C, L), _leaf(B, C, L), _leaf(B, C, L)
    t, w = torch.rand(B, requires_grad=True), torch.rand(B, requires_grad=True)
    leaves = [x0, x1, v, t, w]

    def run():
        x_t, u_t = ops.fm_interpolate(x0, x1, t, 0.1)
        emb = ops.timestep_embedding(t, 301)
        ramp = torch.linspace(-1, 1, L)
        return (ops.fm_loss(v, x0, x1, t, weight=w, sigma_min=0.1) + (x_t * ramp).sum() + (u_t * ramp).mean()
                + (emb * torch.linspace(-1, 1, 301)).sum())

    with use_backend("triton"):
        got = torch.autograd.grad(run(), leaves)
    with use_backend("torch"):
        want = torch.autograd.grad(run(), leaves)
    for name, a, b in zip(("x0", "x1", "v", "t", "weight"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.gpu_tensors
def test_deterministic_loss_and_grads():
    """Partial sums per program, then a fixed-order reduction: repeated calls agree bit for bit."""
    torch.manual_seed(2)
    v, x0, x1 = _leaf(33, 3, 300), torch.randn(33, 3, 300), torch.randn(33, 3, 300)
    t = torch.rand(33, requires_grad=True)
    runs = []
    with use_backend("triton"):
        for _ in range(2):
            x_t, _ = ops.fm_interpolate(x0, x1, t)
            loss = ops.fm_loss(v, x0, x1, t) + x_t.mean()
            runs.append([loss.detach(), *torch.autograd.grad(loss, [v, t])])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.gpu_tensors
def test_fm_loss_op_outputs():
    """The custom op returns (loss, unweighted per-sample means, dv for an upstream 1) in one pass,
    and skips dv (empty) when no gradient is needed."""
    torch.manual_seed(3)
    v, x0, x1, w = torch.randn(4, 5, 6), torch.randn(4, 5, 6), torch.randn(4, 5, 6), torch.rand(4)
    loss, per_sample, dv = torch.ops.flowfm_triton.fm_loss(v, x0, x1, w, 0.2, True)
    diff = v.double() - (x1.double() - 0.8 * x0.double())
    torch.testing.assert_close(per_sample.double(), diff.square().flatten(1).mean(1), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loss.double(), (w.double() * per_sample.double()).mean(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dv.double(), 2 * w.double()[:, None, None] * diff / v.numel(), rtol=1e-6, atol=1e-8)
    _, _, none = torch.ops.flowfm_triton.fm_loss(v, x0, x1, None, 0.2, False)
    assert none.numel() == 0


# ----------------------------------------------------------------------------- torch.compile


def _step(x0, x1, v_param, t, w):
    x_t, u_t = ops.fm_interpolate(x0, x1, t, 0.05)
    emb = ops.timestep_embedding(t, 8)
    v = v_param * x_t + emb.sum(1)[:, None, None]
    return ops.fm_loss(v, x0, x1, t, weight=w, sigma_min=0.05) + 1e-3 * u_t.mean()


@pytest.mark.gpu_tensors
def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(4)
    args = [_leaf(3, 2, 9), _leaf(3, 2, 9), _leaf(3, 2, 9), torch.rand(3, requires_grad=True),
            torch.rand(3, requires_grad=True)]
    with use_backend("triton"):
        eager = _step(*args)
        g_eager = torch.autograd.grad(eager, args)
        graphs = []

        def backend(gm, example_inputs):
            graphs.append(str(gm.graph))
            return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

        compiled = torch.compile(_step, fullgraph=True, backend=backend)
        out = compiled(*args)
        g_out = torch.autograd.grad(out, args)
    # Dispatch happens while tracing: the graph holds the Triton custom ops, opaquely.
    assert len(graphs) == 1
    for name in ("fm_interpolate", "timestep_embedding", "fm_loss"):
        assert f"flowfm_triton.{name}" in graphs[0], name
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_out, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _solve(x, v1, v2):
    ops.euler_step_(x, v1, 0.1)
    y = ops.rk_combine(x, 0.5, [v1, v2], [0.5, 0.5])
    return ops.rk_combine(y, 0.25, [v2, y], [1.0, 0.5], out=y)   # out is both x and a stage


@pytest.mark.gpu_tensors
def test_torch_compile_fullgraph_integrator_updates():
    torch.manual_seed(5)
    x, v1, v2 = torch.randn(4, 3, 11), torch.randn(4, 3, 11), torch.randn(4, 3, 11)
    x_eager, x_comp = x.clone(), x.clone()
    with use_backend("triton"), torch.no_grad():
        want = _solve(x_eager, v1, v2)
        got = torch.compile(_solve, fullgraph=True, backend="aot_eager")(x_comp, v1, v2)
    torch.testing.assert_close(x_comp, x_eager, rtol=0, atol=0)   # the in-place update reaches the input
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- where it runs


def test_on_cpu_only_forced_and_only_when_interpreting():
    """Under the interpreter triton serves CPU tensors only when forced (rank < 0); the automatic
    choice on CPU never picks it."""
    from flowfm_fast.ops import _registry
    x0 = torch.randn(2, 3)
    for op in OPS:
        impl = _registry.impl_for(op, "triton")
        assert impl is not None, op
        assert impl.rank("cpu", _backend.cpu_capability()) == _registry.FORCED_ONLY, op
        assert impl.rank("cuda", "") > 0, op
        flags = (False,) if op in ("euler_step_", "rk_combine") else ()
        assert _registry.select(op, x0.device, flags) is not impl, op


def test_forced_triton_on_cpu_without_interpreter_raises():
    """In a process without TRITON_INTERPRET, forcing triton for CPU tensors is refused, never
    silently run elsewhere."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import pytest, torch; from flowfm_fast import ops\n"
            "x0, x1, t = torch.randn(2, 3), torch.randn(2, 3), torch.rand(2)\n"
            "with ops.use_backend('triton'):\n"
            "    for f in (lambda: ops.fm_interpolate(x0, x1, t), lambda: ops.timestep_embedding(t, 4)):\n"
            "        with pytest.raises(RuntimeError, match='triton.*(fm_interpolate|timestep_embedding)'):\n"
            "            f()\n"
            "print('refused')\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "refused" in r.stdout, r.stderr[-2000:]


def test_timestep_embedding_takes_integer_steps_integrators_refuse_grad():
    from flowfm_fast.ops import _registry
    with use_backend("triton"):
        torch.testing.assert_close(ops.timestep_embedding(torch.arange(5), 8),
                                   naive_timestep_embedding(torch.arange(5), 8).float(), rtol=1e-5, atol=1e-5)
    euler = _registry.impl_for("euler_step_", "triton")
    assert not euler.serves("cpu", _backend.cpu_capability(), False, (True,))   # a gradient is needed
    assert euler.serves("cpu", _backend.cpu_capability(), False, (False,))
    x = torch.randn(3, requires_grad=True)
    with use_backend("triton"), pytest.raises(RuntimeError, match="triton.*euler_step_"):
        ops.euler_step_(x * 1.0, x.detach(), 0.1)


# ----------------------------------------------------------------------------- the GPU compiler


def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter does not type-check like the compiler: build every kernel variant to a
    cubin for sm_90 (no GPU needed, triton ships ptxas) in a process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = Path(__file__).with_name("triton_aot_check.py")
    r = subprocess.run([sys.executable, str(script), "90"], env=env, capture_output=True, text=True, timeout=600)
    if r.returncode == 77:
        pytest.skip(f"no usable ptxas: {r.stdout[-300:]}")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]


@pytest.mark.parametrize("x", [0.3, 0.7, 1.0 / 3.0, 2.0 / (7 * 300), -0.1, 1e-30, 0.0])
def test_float_arguments_keep_float64_precision(x):
    """Float kernel arguments travel as two fp32 halves (Triton passed a Python float as fp32 on
    the GPU); their float64 sum is x to ~48 bits, their fp32 sum is fp32(x)."""
    import numpy as np

    from flowfm_fast.kernels._blocks import f64_split
    hi, lo = f64_split(x)
    assert float(np.float32(hi)) == hi and float(np.float32(lo)) == lo
    assert abs((hi + lo) - x) <= 2.0 ** -46 * abs(x)
    assert np.float32(hi) + np.float32(lo) == np.float32(x)
    assert f64_split(float("inf")) == (float("inf"), 0.0)
