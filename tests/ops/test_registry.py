"""Dispatch: use_backend, FLOWFM_BACKEND, forced-but-missing backends, per-device preference."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import flowfm_fast.ops as ops
from flowfm_fast.ops import _registry as R
from flowfm_fast.ops import backends_for, describe, forced_backend, use_backend

ALL_OPS = ["timestep_embedding", "norm_modulate", "gated_residual", "gated_residual_norm_modulate",
           "fm_interpolate", "fm_loss", "euler_step_", "rk_combine"]


@pytest.fixture(autouse=True)
def no_env_backend(monkeypatch):
    monkeypatch.delenv("FLOWFM_BACKEND", raising=False)
    R.reload_env()
    yield
    monkeypatch.undo()
    R.reload_env()


def set_env_backend(monkeypatch, value: str) -> None:
    """FLOWFM_BACKEND as a process would have it at import (it is read once, then by reload_env)."""
    monkeypatch.setenv("FLOWFM_BACKEND", value)
    R.reload_env()


def call_op(op: str):
    """Run ``op`` once on small valid CPU inputs; returns its result."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4)
    g = torch.randn(2, 4)
    t = torch.rand(2)
    if op == "timestep_embedding":
        return ops.timestep_embedding(t, 8)
    if op == "norm_modulate":
        return ops.norm_modulate(x, g, g)
    if op == "gated_residual":
        return ops.gated_residual(x, x, g)
    if op == "gated_residual_norm_modulate":
        return ops.gated_residual_norm_modulate(x, x, g, g, g)[1]
    if op == "fm_interpolate":
        return ops.fm_interpolate(x, x, t)[0]
    if op == "fm_loss":
        return ops.fm_loss(x, x, x, t)
    if op == "euler_step_":
        return ops.euler_step_(x, x, 0.1)
    if op == "rk_combine":
        return ops.rk_combine(x, 0.1, [x], [1.0])
    raise AssertionError(op)


@pytest.mark.parametrize("op", ALL_OPS)
def test_every_op_has_torch_reference(op):
    assert "torch" in backends_for(op)
    assert f"{op}: " in describe()


def test_backends_for_norm_modulate_and_unknown():
    assert "torch" in backends_for("norm_modulate")
    assert backends_for("no_such_op") == ()


@pytest.mark.parametrize("op", ALL_OPS)
def test_use_backend_torch_runs_every_op(op):
    auto = call_op(op)
    with use_backend("torch"):
        assert forced_backend() == "torch"
        forced = call_op(op)
    # The automatic choice may be a fused backend, which keeps the 1e-5 contract, not bit-exactness.
    torch.testing.assert_close(forced, auto, rtol=1e-5, atol=1e-6)


def test_use_backend_nests_and_restores():
    assert forced_backend() is None
    with use_backend("torch"):
        assert forced_backend() == "torch"
        with use_backend("cuda"):
            assert forced_backend() == "cuda"
            with use_backend(None):
                assert forced_backend() is None
            assert forced_backend() == "cuda"
        assert forced_backend() == "torch"
    assert forced_backend() is None


def test_use_backend_restores_after_exception():
    with pytest.raises(KeyError):
        with use_backend("cpp"):
            raise KeyError("boom")
    assert forced_backend() is None


@pytest.mark.parametrize("name", ["nonsense", "Torch", "", "gpu"])
def test_use_backend_invalid_name(name):
    with pytest.raises(ValueError, match="backend must be one of"):
        with use_backend(name):
            pass
    assert forced_backend() is None


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("backend", ["cuda", "triton", "cpp"])
def test_forced_missing_backend_raises_naming_op(op, backend):
    if backend in backends_for(op):
        pytest.skip(f"{backend} implements {op} in this build")
    with use_backend(backend):
        with pytest.raises(RuntimeError, match=rf"{backend}.*{op}"):
            call_op(op)


def test_forced_missing_backend_does_not_fall_back():
    """A forced backend never falls back silently, even inside an outer torch block."""
    with use_backend("torch"):
        with use_backend("cuda"):
            with pytest.raises(RuntimeError, match="norm_modulate"):
                call_op("norm_modulate")
        assert call_op("norm_modulate").shape == (2, 3, 4)


def test_env_var_forces_torch(monkeypatch):
    set_env_backend(monkeypatch, "torch")
    assert forced_backend() == "torch"
    assert call_op("fm_loss").dtype == torch.float32


@pytest.mark.parametrize("value", [" TORCH ", "Torch\n"])
def test_env_var_is_trimmed_and_case_insensitive(monkeypatch, value):
    set_env_backend(monkeypatch, value)
    assert forced_backend() == "torch"


def test_env_var_empty_means_automatic(monkeypatch):
    set_env_backend(monkeypatch, "")
    assert forced_backend() is None
    assert call_op("gated_residual").shape == (2, 3, 4)


def test_env_var_missing_backend_raises(monkeypatch):
    set_env_backend(monkeypatch, "cuda")
    if "cuda" in backends_for("gated_residual"):
        pytest.skip("cuda implements gated_residual in this build")
    with pytest.raises(RuntimeError, match="gated_residual"):
        call_op("gated_residual")


def test_env_var_invalid_raises(monkeypatch):
    set_env_backend(monkeypatch, "nonsense")
    with pytest.raises(ValueError, match="FLOWFM_BACKEND"):
        forced_backend()
    with pytest.raises(ValueError, match="FLOWFM_BACKEND"):
        call_op("norm_modulate")


def test_context_manager_overrides_env(monkeypatch):
    set_env_backend(monkeypatch, "cuda")
    with use_backend("torch"):
        assert forced_backend() == "torch"
        assert call_op("fm_interpolate").shape == (2, 3, 4)
    assert forced_backend() == "cuda"


# ----------------------------------------------------------------------------- selection rules (fake op)


@pytest.fixture
def fake_op(monkeypatch):
    """A throwaway op registered only for the duration of one test."""
    name = "test_registry_fake_op"
    monkeypatch.setitem(R._IMPLS, name, {})
    return name


def test_register_rejects_unknown_backend(fake_op):
    with pytest.raises(ValueError, match="backend must be one of"):
        R.register(fake_op, "opencl")
    assert backends_for(fake_op) == ()


def test_fused_backend_must_declare_ranks(fake_op):
    with pytest.raises(ValueError, match="ranks"):
        R.register(fake_op, "cpp")(lambda: "cpp")


def test_highest_rank_that_serves_wins(fake_op):
    R.register(fake_op, "torch")(lambda: "torch")
    R.register(fake_op, "cpp", ranks={"cpu": 1}, accepts=lambda flags: flags[0])(lambda: "cpp")
    R.register(fake_op, "triton", ranks={"cuda": 1, "cpu": R.FORCED_ONLY})(lambda: "triton")
    R.register(fake_op, "cuda", ranks={"cuda": 2}, accepts=lambda flags: flags[0])(lambda: "cuda")
    cpu, gpu = torch.device("cpu"), torch.device("cuda")  # selection only looks at the device type
    assert set(backends_for(fake_op)) == {"torch", "cpp", "triton", "cuda"}
    assert R.select(fake_op, cpu, (True,)).fn() == "cpp"
    assert R.select(fake_op, cpu, (False,)).fn() == "torch"     # cpp declines: the reference
    assert R.select(fake_op, gpu, (True,)).fn() == "cuda"       # rank 2 over triton's 1
    assert R.select(fake_op, gpu, (False,)).fn() == "triton"
    with use_backend("triton"):
        assert R.select(fake_op, cpu, (True,)).fn() == "triton"  # forced-only rank serves when forced


def test_rank_per_cpu_capability(fake_op, monkeypatch):
    """A kernel measured slower than the reference on one instruction set steps aside there only."""
    R.register(fake_op, "torch")(lambda: "torch")
    R.register(fake_op, "cpp", ranks={"cpu": 1, "cpu:avx2": -1})(lambda: "cpp")
    impl = R.impl_for(fake_op, "cpp")
    assert impl.rank("cpu", "avx512") == 1 and impl.rank("cpu", "avx2") == -1 and impl.rank("cuda", "avx2") is None
    cpu = torch.device("cpu")
    for capability, want in (("avx512", "cpp"), ("avx2", "torch"), ("default", "cpp")):
        monkeypatch.setattr(R._backend, "cpu_capability", lambda c=capability: c)
        assert R.select(fake_op, cpu).fn() == want, capability
        with use_backend("cpp"):
            assert R.select(fake_op, cpu).fn() == "cpp"  # forcing still reaches it


def test_rank_inside_torch_compile(fake_op):
    """A "compile:<device>" rank applies only while torch.compile traces: the op decomposes to the
    reference inside the graph and keeps its kernel in eager calls; forcing still reaches it."""
    R.register(fake_op, "torch")(lambda x: x * 2)
    R.register(fake_op, "cpp", ranks={"cpu": 1, "compile:cpu": 0})(lambda x: x * 3)
    impl = R.impl_for(fake_op, "cpp")
    assert impl.rank("cpu", "avx2") == 1 and impl.rank("cpu", "avx2", compiling=True) == 0
    assert impl.rank("cuda", "avx2", compiling=True) is None
    x = torch.ones(3)
    fn = lambda v: R.select(fake_op, v).fn(v)  # noqa: E731
    assert torch.equal(fn(x), x * 3)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(fn, fullgraph=True, backend="eager")(x), x * 2)
    assert torch.equal(fn(x), x * 3)  # the eager choice (cached) is untouched
    with use_backend("cpp"):
        torch._dynamo.reset()
        assert torch.equal(torch.compile(fn, fullgraph=True, backend="eager")(x), x * 3)
    torch._dynamo.reset()


@pytest.mark.skipif("cpp" not in backends_for("gated_residual"), reason="needs the C++ extension")
def test_gated_residual_decomposes_inside_compiled_graphs_on_cpu():
    """The measured choice (benchmarks/results/cpu-avx2-compile-ranks.md): eager calls take the cpp
    kernel, a compiled graph the reference (no flowfm:: op in it)."""
    res, h, gate = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 8)
    assert R.select("gated_residual", res).backend == "cpp"
    assert R.select("gated_residual_norm_modulate", res).backend == "cpp"
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(lambda r, a, g: ops.gated_residual_norm_modulate(r, a, g, None, None, "layer")[1]
                       + ops.gated_residual(r, a, g), fullgraph=True, backend=keep)
    with use_backend(None):
        want = fn(res, h, gate)
    with use_backend("torch"):
        ref = ops.gated_residual_norm_modulate(res, h, gate, None, None, "layer")[1] + ops.gated_residual(res, h, gate)
    torch.testing.assert_close(want, ref)
    targets = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert targets and not any("flowfm" in t for t in targets), targets
    torch._dynamo.reset()


def test_choice_is_cached_and_reset_by_register(fake_op):
    R.register(fake_op, "torch")(lambda: "torch")
    calls = []
    R.register(fake_op, "cpp", ranks={"cpu": 1}, accepts=lambda flags: calls.append(flags) or True)(lambda: "cpp")
    cpu = torch.device("cpu")
    first = R.select(fake_op, cpu, (1,))
    assert R.select(fake_op, cpu, (1,)) is first and calls == [(1,)]   # predicate asked once per key
    R.select(fake_op, cpu, (2,))
    assert calls == [(1,), (2,)]
    R.register(fake_op, "cpp", ranks={"cpu": -1})(lambda: "cpp2")
    assert R.select(fake_op, cpu, (1,)).fn() == "torch"


def test_compiled_backends_step_aside_under_torch_func(fake_op):
    R.register(fake_op, "torch")(lambda x: x * 2)
    R.register(fake_op, "cpp", ranks={"cpu": 1}, in_transforms=False)(lambda x: x * 3)
    x = torch.ones(())
    assert R.select(fake_op, x.device).fn(x) == 3
    grad = torch.func.grad(lambda v: R.select(fake_op, v.device).fn(v))(x)
    assert grad == 2
    with use_backend("cpp"), pytest.raises(RuntimeError, match="torch.func transform"):
        torch.func.grad(lambda v: R.select(fake_op, v.device).fn(v))(x)


def test_unknown_device_type_uses_torch(fake_op):
    R.register(fake_op, "torch")(lambda: "torch")
    R.register(fake_op, "cpp", ranks={"cpu": 1})(lambda: "cpp")
    assert R.select(fake_op, torch.device("meta")).fn() == "torch"


def test_forced_backend_that_declines_inputs_raises(fake_op):
    R.register(fake_op, "torch")(lambda: "torch")
    R.register(fake_op, "cpp", ranks={"cpu": 1}, accepts=lambda flags: False)(lambda: "cpp")
    with use_backend("cpp"):
        with pytest.raises(RuntimeError, match=rf"cpp.*cannot run {fake_op}"):
            R.select(fake_op, torch.device("cpu"))
    with use_backend("torch"):
        assert R.select(fake_op, torch.device("cpu")).fn() == "torch"


def test_env_var_read_at_import():
    code = "from flowfm_fast import ops; print(ops.forced_backend())"
    env = dict(os.environ, FLOWFM_BACKEND="torch")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "torch", r.stderr[-2000:]


def test_forced_missing_backend_lists_available(fake_op):
    R.register(fake_op, "torch")(lambda: "torch")
    with use_backend("triton"):
        with pytest.raises(RuntimeError, match=rf"no implementation of {fake_op} \(available: torch\)"):
            R.select(fake_op, torch.device("cpu"))


def test_kernel_spec_schemas_match_the_extension():
    """Each KernelSpec bound to a flowfm:: op states the schema csrc/schema.cpp defines (the fake
    kernel and the Python derivative are written against it), and every extension op has a spec."""
    from flowfm_fast import _backend
    from flowfm_fast.ops import _ext
    if _backend.extension is None:
        pytest.skip("flowfm_fast._C is not built")
    assert _ext.BOUND, "no KernelSpec bound to the extension"
    for name, spec in _ext.BOUND.items():
        ours = torch._C.parse_schema(f"flowfm::{name}{spec.schema}")
        theirs = getattr(torch.ops.flowfm, name).default._schema
        assert str(ours) == str(theirs), f"{name}: spec {ours} != extension {theirs}"
    defined = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("flowfm::")}
    defined = {n.split(".")[0] for n in defined if _ext.defines(n.split(".")[0])} - {"abi_version"}
    assert defined <= set(_ext.BOUND), f"extension ops without a KernelSpec: {sorted(defined - set(_ext.BOUND))}"
