"""Which fused ops should stay opaque kernels inside torch.compile, and which should decompose to
the reference so Inductor fuses them with their neighbours? The measurement behind the
``"compile:<device>"`` ranks (flowfm_fast/ops/_registry.py).

Cases: torch.compile of the ``small`` model's training step (DiT and ResNet velocity, B = 64) and
of the DiT's velocity in 8-step Euler sampling (B = 1 and 64). Variants, each its own compiled
copy of the model, timed interleaved (:func:`_common.time_interleaved`):

- ``default``: the registry's choice under compile (the ranks as shipped);
- ``all-cpp``: every op with a cpp kernel traced as that kernel;
- ``all-cpp,<group>-ref``: the same with one group of ops traced as the reference;
- ``compile``: every op traced as the reference (= compile of the reference model), the row
  report.py takes the "vs compile" ratios against.

The choice is baked in at trace time, so each variant patches the op modules' ``select`` while it
is traced and run; Dynamo's guard on ``select`` keeps the variants' graphs apart.

    pytest benchmarks/bench_compile_ranks.py --benchmark-json=ranks.json
    python benchmarks/report.py ranks.json
"""
from __future__ import annotations

import contextlib
import sys

import pytest
import torch

from bench_e2e import _timed, _warm, sample_fn, train_step_fn
from flowfm_fast.models import get_config
from flowfm_fast.ops import _registry

GROUPS = {"gated_residual": ("gated_residual", "gated_residual_norm_modulate"), "norm_modulate": ("norm_modulate",),
          "attention": ("attention",), "linear_act": ("linear_act",), "batch_norm_act": ("batch_norm_act",)}
# The op modules whose `select` a variant patches: those of the ops above (gated_residual's module
# holds both of its ops), plus the fm ops of the training step.
MODULES = ("gated_residual", "norm_modulate", "attention", "linear_act", "batch_norm_act", "fm_loss",
           "fm_interpolate", "timestep_embedding")


def _select_as(reference_ops: frozenset):
    """A ``select`` that traces ``reference_ops`` as the reference and every other op as its cpp
    kernel where it has one (module-level closures are cached below, so Dynamo's guard holds)."""
    def select(op, where, flags=()):
        impls = _registry._IMPLS[op]
        if op in reference_ops or "cpp" not in impls or not impls["cpp"].serves("cpu", "", False, flags):
            return impls["torch"]
        return impls["cpp"]
    return select


_SELECTS: dict[frozenset, object] = {}


def _variant_context(name):
    if name == "default":
        return contextlib.nullcontext
    if name == "compile":
        reference = frozenset(op for ops_ in GROUPS.values() for op in ops_) | {"fm_loss", "fm_interpolate",
                                                                              "timestep_embedding"}
    else:
        reference = frozenset(op for part in name.split(",")[1:] for op in GROUPS[part.removesuffix("-ref")])
    select = _SELECTS.setdefault(reference, _select_as(reference))

    @contextlib.contextmanager
    def context():
        modules = [sys.modules["flowfm_fast.ops." + m] for m in MODULES]
        saved = [m.select for m in modules]
        for m in modules:
            m.select = select
        try:
            yield
        finally:
            for m, s in zip(modules, saved):
                m.select = s
    return context


def _variants(groups):
    return ["default", "all-cpp", *(f"all-cpp,{g}-ref" for g in groups), "compile"]


CASES = [("train", "dit", 64, _variants(["gated_residual", "norm_modulate", "attention", "linear_act"])),
         ("train", "resnet", 64, _variants(["norm_modulate", "batch_norm_act"])),
         ("sample", "dit", 1, _variants(["gated_residual", "norm_modulate", "attention"])),
         ("sample", "dit", 64, _variants(["gated_residual", "norm_modulate", "attention"]))]


@pytest.mark.parametrize("what,velocity,batch,names", CASES, ids=[f"{c[0]}-{c[1]}-B{c[2]}" for c in CASES])
def test_compile_ranks(benchmark, device, what, velocity, batch, names):
    if device.type != "cpu" or "cpp" not in _registry.backends_for("gated_residual"):
        pytest.skip("the CPU compile ranks need the C++ extension on a CPU run")
    torch._dynamo.reset()
    variants = {}
    for name in names:
        if what == "sample":
            z = torch.randn(batch, get_config("small").encoder.z_dim, device=device)
            fn = sample_fn(device, z, "default")
        else:
            fn = train_step_fn(device, velocity, torch.randn(batch, 3, 300, device=device), "default")
        variants[name] = (_variant_context(name), fn)
    warm = _warm(variants, 3)
    _timed(benchmark, f"compiled {what} small/{velocity} B={batch}", variants, 20 if batch == 1 else 12,
           dict(op="compile_ranks", velocity=velocity, device=device.type, compiled_variants=len(variants)), warm)
