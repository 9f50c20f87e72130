"""End to end: a joint training step and 8-step Euler sampling of the ``small`` config, four ways
in one run, interleaved round by round (:func:`_common.time_interleaved`), so the ratios are not
bent by the machine's drift between one implementation's rounds and the next's:

- ``eager``: every op on the plain-PyTorch reference (``use_backend("torch")``);
- ``compile``: torch.compile of the same reference model, with every op module's ``select``
  swapped for a trace-friendly "always the reference" (:func:`_reference_dispatch`), so the
  baseline is the strongest compile of the model whether or not the registry's dispatch traces;
- ``cpp`` (CPU) / ``auto`` (GPU): the default dispatch with the fused backends;
- ``cpp+compile`` / ``auto+compile``: torch.compile of the model on the default dispatch: our
  fused ops stay in the graph as opaque custom ops (fake kernels, registered autograd) and
  Inductor fuses what lies between them. This is what a user who compiles their model gets.
- GPU only: ``compile-ro`` and ``auto+compile-ro``, the same two with ``mode="reduce-overhead"``
  (CUDA graphs through Inductor), and for the training step ``auto+graph``: our ops with the whole
  step (forward, backward, AdamW) captured as one CUDA graph, as ``train_flowfm(cuda_graph=True)``
  runs it (:class:`flowfm_fast.train.graph.CapturedStep`).

Each variant has its own copy of the model (same initial weights) and its own optimizer. The
compiled variants are distinct graphs of the same code: Dynamo tells them apart by its guard on
the op modules' ``select`` (the reference variant runs with it patched), and ``extra_info``
records the graphs, graph breaks and recompiles during the timing (report.py marks a compiled
row that is not one graph, or recompiled while timed).

The group is the case; report.py prints each implementation as a ratio against eager and compile.
"""
from __future__ import annotations

import contextlib
import sys

import pytest
import torch

from _common import graph_stats, time_interleaved
from conftest import sync
from flowfm_fast import ops
from flowfm_fast.models import FlowFM, get_config
from flowfm_fast.train.graph import CapturedStep
from flowfm_fast.train.loop import make_optimizer
from flowfm_fast.ops import _registry, use_backend

BATCH = 64
FUSED = "auto" if torch.cuda.is_available() else "cpp"
IMPLS = ["eager", "compile", FUSED, FUSED + "+compile"] + (
    ["compile-ro", FUSED + "+compile-ro"] if torch.cuda.is_available() else [])
CAPTURED = FUSED + "+graph"  # the training step only, on CUDA


def _fused_available(device) -> bool:
    wanted = ("triton", "cuda") if device.type == "cuda" else ("cpp",)
    return any(b in wanted for op in _registry._IMPLS for b in ops.backends_for(op))


def _select_reference(op, device, *tensors):
    """The op modules' ``select`` under the ``compile`` variant: always the ``torch`` reference,
    without reading the ContextVar. Module-level, so Dynamo's guard on it holds across calls."""
    return _registry._IMPLS[op]["torch"]


@contextlib.contextmanager
def _reference_dispatch():
    """Every op module's ``select`` returns the ``torch`` reference without reading the ContextVar."""
    original = _registry.select
    # The op modules' own `select` names only: patching _registry.select itself would make the
    # restore below write the patched function back everywhere.
    patched = [m for name, m in list(sys.modules.items())
               if name.startswith("flowfm_fast.ops.") and m is not _registry
               and getattr(m, "select", None) is original]
    for m in patched:
        m.select = _select_reference
    try:
        yield
    finally:
        for m in patched:
            m.select = original


def _impl_context(impl):
    """A factory of the dispatch an implementation runs under (entered around every call)."""
    if impl == "eager":
        return lambda: use_backend("torch")
    if impl.startswith("compile"):
        def reference():
            stack = contextlib.ExitStack()
            stack.enter_context(use_backend("torch"))
            stack.enter_context(_reference_dispatch())
            return stack
        return reference
    return contextlib.nullcontext


def _compile_mode(impl) -> str | None:
    """None for an uncompiled variant, else torch.compile's mode."""
    if impl.endswith("compile-ro"):
        return "reduce-overhead"
    return "default" if impl.endswith("compile") else None


def _model(device, velocity):
    torch.manual_seed(0)
    model = FlowFM(get_config("small", velocity=velocity)).to(device)
    # Perturb the zero-initialised layers so the timed work is representative of a trained model.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def _warm(variants, calls):
    """Compile and warm every variant outside the timing; the compile counters it moved."""
    before = graph_stats()
    for impl, (context, fn) in variants.items():
        for _ in range(calls):
            with context():
                fn()
    after = graph_stats()
    return dict(compile_graphs=after[0] - before[0], compile_breaks=after[1] - before[1])


def _timed(benchmark, group, variants, rounds, info, warm):
    before = graph_stats()
    time_interleaved(benchmark, group=group, variants=variants, rounds=rounds, info=info)
    benchmark.extra_info.update(warm, recompiles_while_timed=graph_stats()[0] - before[0])


def train_step_fn(device, velocity, x1, mode: str | None = None, captured: bool = False):
    """A fresh ``small`` model's training step on ``x1`` (loss, backward, the trainer's fused AdamW),
    as a callable that synchronises; ``mode``: torch.compile of ``model.loss`` in that mode;
    ``captured``: the whole step as one CUDA graph (:class:`CapturedStep`)."""
    model = _model(device, velocity)
    opt = make_optimizer(model, lr=1e-4, weight_decay=0.01)
    loss_fn = model.loss if mode is None else torch.compile(model.loss, mode=mode)

    def train(x1):
        loss = loss_fn(x1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return (loss.detach(),)

    run = CapturedStep(train, x1.shape, device, None, opt) if captured else train

    def step():
        run(x1)
        sync(device)
    return step


def sample_fn(device, z, mode: str | None = None):
    """A fresh ``small`` DiT's 8-step Euler sampling from ``z`` as a callable that synchronises;
    ``mode``: torch.compile of its velocity network in that mode."""
    model = _model(device, "dit").eval()
    if mode is not None:
        model.velocity.forward_modulated = torch.compile(model.velocity.forward_modulated, mode=mode)

    def run():
        with torch.no_grad():
            # A compiled variant's own CUDA graphs (reduce-overhead) cannot nest in the solver's.
            model.sample(z, steps=8, method="euler", generator=torch.Generator(device).manual_seed(0),
                         graph=False if mode is not None else None)
        sync(device)
    return run


@pytest.mark.parametrize("velocity", ["dit", "resnet"])
def test_train_step(benchmark, device, velocity):
    if not _fused_available(device):
        pytest.skip(f"no fused backend on {device.type}")
    torch._dynamo.reset()
    x1 = torch.randn(BATCH, 3, 300, device=device)
    variants = {impl: (_impl_context(impl), train_step_fn(device, velocity, x1, _compile_mode(impl), impl == CAPTURED))
                for impl in IMPLS + ([CAPTURED] if device.type == "cuda" else [])}
    warm = _warm(variants, 3)
    _timed(benchmark, f"train_step small/{velocity} B={BATCH}", variants, 25,
           dict(op="train_step", velocity=velocity, shape=f"B={BATCH},C=3,L=300", device=device.type), warm)


@pytest.mark.parametrize("batch", [1, 64] + ([512] if torch.cuda.is_available() else []))
def test_sample_8_euler(benchmark, device, batch):
    if not _fused_available(device):
        pytest.skip(f"no fused backend on {device.type}")
    torch._dynamo.reset()
    z = torch.randn(batch, get_config("small").encoder.z_dim, device=device)
    variants = {impl: (_impl_context(impl), sample_fn(device, z, _compile_mode(impl))) for impl in IMPLS}
    warm = _warm(variants, 2)
    _timed(benchmark, f"sample euler K=8 small/dit B={batch}", variants, 10 if batch > 1 else 20,
           dict(op="sample", velocity="dit", shape=f"B={batch},K=8", device=device.type), warm)
