"""K-step sampling of the ``small`` DiT-1D generator: our solver against the ways people write it.

Implementations, timed in the same run on the same model, x0 and z (Euler on the uniform grid):

- ``eager``: the baseline, a plain per-step Python loop ``x = x + dt * model.velocity(x, t, z)``
  with every op on the plain-PyTorch reference (``use_backend("torch")``);
- ``torchdiffeq``: ``odeint(method="euler")`` on the fixed (K + 1)-point grid, calling the same
  ``model.velocity(x, t, z)`` under the default (fused) dispatch, so against ``ours`` it measures
  the integrator alone: conditioning per call, out-of-place updates, the stacked trajectory;
- ``ours``: :class:`FixedStepSolver` with the conditioning of every step precomputed, the fused
  in-place update and the default fused backend (``graph=False``);
- GPU only: ``ours_graph`` (the same with ``graph=True``: one CUDA-graph replay per solve) and
  ``compile``: ``torch.compile(mode="reduce-overhead")`` of the eager loop of the reference
  (CUDA graphs through Inductor), with the reference dispatch made trace-friendly as in bench_e2e.

K in {1, 2, 4, 8, 16} x batch in {1, 64, 512}; on the CPU batch 512 runs K in {1, 8} only. The
group is the case, ``extra_info["impl"]`` the implementation; report.py prints ratios against
``eager`` (and ``compile`` on GPU) and judges ``ours`` at 8-step Euler on the CPU against the bar
(>= 2x eager at batch 1, >= 1.5x at batch 64, never slower than torchdiffeq).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from bench_e2e import _fused_available, _model, _reference_dispatch
from conftest import sync
from flowfm_fast.integrate import FixedStepSolver, clear_graph_cache
from flowfm_fast.ops import use_backend

CUDA = torch.cuda.is_available()
STEPS = (1, 2, 4, 8, 16)
BATCHES = (1, 64, 512)
IMPLS = ["eager", "torchdiffeq", "ours"] + (["ours_graph", "compile"] if CUDA else [])
CASES = [(k, b) for b in BATCHES for k in STEPS if CUDA or b != 512 or k in (1, 8)]


def _eager_loop(net, K):
    def run(x0, z):
        x, dt = x0, 1.0 / K
        for n in range(K):
            t = torch.full((x0.shape[0],), n * dt, device=x0.device)
            x = x + dt * net(x, t, z)
        return x
    return run


def _make(impl, net, K, device):
    """(callable(x0, z) -> x at t = 1, the context it runs under)."""
    if impl == "eager":
        return _eager_loop(net, K), use_backend("torch")
    if impl == "compile":
        stack = contextlib.ExitStack()
        stack.enter_context(use_backend("torch"))
        stack.enter_context(_reference_dispatch())
        compiled = torch.compile(_eager_loop(net, K), mode="reduce-overhead")
        # Clone: reduce-overhead's outputs live in its graph pool and are overwritten by the next run.
        return (lambda x0, z: compiled(x0, z).clone()), stack
    if impl == "torchdiffeq":
        torchdiffeq = pytest.importorskip("torchdiffeq")
        grid = torch.linspace(0.0, 1.0, K + 1, device=device)

        def run(x0, z):
            return torchdiffeq.odeint(lambda t, y: net(y, t.expand(y.shape[0]), z), x0, grid, method="euler")[-1]
        return run, contextlib.nullcontext()
    if not _fused_available(device):
        pytest.skip(f"no fused backend on {device.type}")
    solver = FixedStepSolver("euler")
    graph = impl == "ours_graph"
    return (lambda x0, z: solver.solve(net, x0, K, z=z, graph=graph)), contextlib.nullcontext()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("K,batch", CASES, ids=[f"K{k}-B{b}" for k, b in CASES])
def test_solve_euler(benchmark, device, impl, K, batch):
    torch._dynamo.reset()
    clear_graph_cache()
    model = _model(device, "dit").eval()
    net = model.velocity
    g = torch.Generator(device).manual_seed(0)
    x0 = torch.randn(batch, model.cfg.channels, model.cfg.length, device=device, generator=g)
    z = torch.randn(batch, model.cfg.encoder.z_dim, device=device, generator=g)
    with torch.no_grad():
        with use_backend("torch"):
            ref = _eager_loop(net, K)(x0, z)
        fn, ctx = _make(impl, net, K, device)

        def run():
            fn(x0, z)
            sync(device)

        with ctx:
            got = fn(x0, z)
            for _ in range(2):   # compile / capture / warm caches outside the timing
                run()
            benchmark.group = f"solve euler K={K} small/dit B={batch}"
            benchmark.extra_info.update(impl=impl, op="solve", method="euler", steps=K, batch=batch,
                                        shape=f"B={batch},C=3,L={model.cfg.length},K={K}", dtype="fp32",
                                        device=device.type,
                                        max_abs_err=float((got - ref).abs().max()))
            benchmark(run)
