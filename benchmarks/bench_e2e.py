"""End to end: a joint training step and 8-step Euler sampling of the ``small`` config, in one run:

- ``eager``: every op on the plain-PyTorch reference (``use_backend("torch")``);
- ``compile``: torch.compile of the same reference model, with every op module's ``select``
  swapped for a trace-friendly "always the reference" (:func:`_reference_dispatch`), so the
  baseline is the strongest compile of the model whether or not the registry's ContextVar
  dispatch traces (when it did not, every op call broke the graph); ``extra_info`` records the
  graphs and breaks;
- ``cpp`` (CPU) / ``auto`` (GPU): the default dispatch with the fused backends.

Each benchmark's ``group`` is the case; ``extra_info["impl"]`` names the implementation, and
report.py prints every implementation as a ratio against eager and compile in the same group.
The copy bandwidth (the roofline) is bench_copy.py's and the session's (conftest.py).
"""
from __future__ import annotations

import contextlib
import sys

import pytest
import torch

from _common import graph_stats
from conftest import sync
from flowfm_fast import ops
from flowfm_fast.models import FlowFM, get_config
from flowfm_fast.train.loop import make_optimizer
from flowfm_fast.ops import _registry, use_backend

BATCH = 64
FUSED = "auto" if torch.cuda.is_available() else "cpp"
IMPLS = ["eager", "compile", FUSED]


def _fused_available(device) -> bool:
    wanted = ("triton", "cuda") if device.type == "cuda" else ("cpp",)
    return any(b in wanted for op in _registry._IMPLS for b in ops.backends_for(op))


@contextlib.contextmanager
def _reference_dispatch():
    """Every op module's ``select`` returns the ``torch`` reference without reading the ContextVar."""
    def select_reference(op, device, *tensors):
        return _registry._IMPLS[op]["torch"]

    original = _registry.select
    # The op modules' own `select` names only: patching _registry.select itself would make the
    # restore below write the patched function back everywhere.
    patched = [m for name, m in list(sys.modules.items())
               if name.startswith("flowfm_fast.ops.") and m is not _registry
               and getattr(m, "select", None) is original]
    for m in patched:
        m.select = select_reference
    try:
        yield
    finally:
        for m in patched:
            m.select = original


def _impl_context(impl, device):
    """The dispatch an implementation runs under (entered around warm-up and timing)."""
    if impl == "eager":
        return use_backend("torch")
    if impl == "compile":
        stack = contextlib.ExitStack()
        stack.enter_context(use_backend("torch"))
        stack.enter_context(_reference_dispatch())
        return stack
    if not _fused_available(device):
        pytest.skip(f"no fused backend on {device.type}")
    return contextlib.nullcontext()


def _model(device, velocity):
    torch.manual_seed(0)
    model = FlowFM(get_config("small", velocity=velocity)).to(device)
    # Perturb the zero-initialised layers so the timed work is representative of a trained model.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("velocity", ["dit", "resnet"])
def test_train_step(benchmark, device, impl, velocity):
    torch._dynamo.reset()
    model = _model(device, velocity)
    opt = make_optimizer(model, lr=1e-4, weight_decay=0.01)  # the trainer's (fused) AdamW
    loss_fn = torch.compile(model.loss) if impl == "compile" else model.loss
    x1 = torch.randn(BATCH, 3, 300, device=device)

    def step():
        loss = loss_fn(x1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)

    with _impl_context(impl, device):
        before = graph_stats()
        for _ in range(3):  # compile and warm up outside the timing
            step()
        benchmark.group = f"train_step small/{velocity} B={BATCH}"
        benchmark.extra_info.update(impl=impl, op="train_step", shape=f"B={BATCH},C=3,L=300", device=device.type)
        if impl == "compile":
            benchmark.extra_info.update(compile_graphs=graph_stats()[0] - before[0],
                                        compile_breaks=graph_stats()[1] - before[1])
        benchmark.pedantic(step, rounds=25, iterations=1, warmup_rounds=1)  # ~0.1 s steps: a stabler median


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", [1, 64])
def test_sample_8_euler(benchmark, device, impl, batch):
    torch._dynamo.reset()
    model = _model(device, "dit").eval()
    z = torch.randn(batch, model.cfg.encoder.z_dim, device=device)
    if impl == "compile":
        model.velocity.forward_modulated = torch.compile(model.velocity.forward_modulated)

    def run():
        with torch.no_grad():
            model.sample(z, steps=8, method="euler", generator=torch.Generator(device).manual_seed(0))
        sync(device)

    with _impl_context(impl, device):
        before = graph_stats()
        for _ in range(2):
            run()
        benchmark.group = f"sample euler K=8 small/dit B={batch}"
        benchmark.extra_info.update(impl=impl, op="sample", shape=f"B={batch},K=8", device=device.type)
        if impl == "compile":
            benchmark.extra_info.update(compile_graphs=graph_stats()[0] - before[0],
                                        compile_breaks=graph_stats()[1] - before[1])
        benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)

