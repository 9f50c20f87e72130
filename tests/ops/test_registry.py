"""Dispatch: use_backend, FLOWFM_BACKEND, forced-but-missing backends, per-device preference."""
from __future__ import annotations

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
    monkeypatch.setenv("FLOWFM_BACKEND", "torch")
    assert forced_backend() == "torch"
    assert call_op("fm_loss").dtype == torch.float32


@pytest.mark.parametrize("value", [" TORCH ", "Torch\n"])
def test_env_var_is_trimmed_and_case_insensitive(monkeypatch, value):
    monkeypatch.setenv("FLOWFM_BACKEND", value)
    assert forced_backend() == "torch"


def test_env_var_empty_means_automatic(monkeypatch):
    monkeypatch.setenv("FLOWFM_BACKEND", "")
    assert forced_backend() is None
    assert call_op("gated_residual").shape == (2, 3, 4)


def test_env_var_missing_backend_raises(monkeypatch):
    monkeypatch.setenv("FLOWFM_BACKEND", "cuda")
    if "cuda" in backends_for("gated_residual"):
        pytest.skip("cuda implements gated_residual in this build")
    with pytest.raises(RuntimeError, match="gated_residual"):
        call_op("gated_residual")


def test_env_var_invalid_raises(monkeypatch):
    monkeypatch.setenv("FLOWFM_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FLOWFM_BACKEND"):
        forced_backend()
    with pytest.raises(ValueError, match="FLOWFM_BACKEND"):
        call_op("norm_modulate")


def test_context_manager_overrides_env(monkeypatch):
    monkeypatch.setenv("FLOWFM_BACKEND", "cuda")
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


def test_cpu_prefers_cpp_then_falls_back_to_torch(fake_op):
    R.register(fake_op, "torch")(lambda: "torch")
    accept = {"cpp": True}
    R.register(fake_op, "cpp", can_use=lambda *ts: accept["cpp"])(lambda: "cpp")
    R.register(fake_op, "triton")(lambda: "triton")   # not on the CPU preference list
    cpu = torch.device("cpu")
    assert set(backends_for(fake_op)) == {"torch", "cpp", "triton"}
    assert R.select(fake_op, cpu).fn() == "cpp"
    accept["cpp"] = False
    assert R.select(fake_op, cpu).fn() == "torch"


def test_cuda_device_prefers_triton(fake_op):
    R.register(fake_op, "torch")(lambda: "torch")
    R.register(fake_op, "cuda")(lambda: "cuda")
    R.register(fake_op, "triton", can_use=lambda *ts: bool(ts and ts[0]))(lambda: "triton")
    dev = torch.device("cuda")   # selection only looks at the device type; nothing runs on it
    assert R.select(fake_op, dev, True).fn() == "triton"
    assert R.select(fake_op, dev, False).fn() == "cuda"


def test_unknown_device_type_uses_torch(fake_op):
    R.register(fake_op, "torch")(lambda: "torch")
    R.register(fake_op, "cpp")(lambda: "cpp")
    assert R.select(fake_op, torch.device("meta")).fn() == "torch"


def test_forced_backend_that_declines_inputs_raises(fake_op):
    R.register(fake_op, "torch")(lambda: "torch")
    R.register(fake_op, "cpp", can_use=lambda *ts: False)(lambda: "cpp")
    with use_backend("cpp"):
        with pytest.raises(RuntimeError, match=rf"cpp.*cannot run {fake_op}"):
            R.select(fake_op, torch.device("cpu"))
    with use_backend("torch"):
        assert R.select(fake_op, torch.device("cpu")).fn() == "torch"


def test_forced_missing_backend_lists_available(fake_op):
    R.register(fake_op, "torch")(lambda: "torch")
    with use_backend("triton"):
        with pytest.raises(RuntimeError, match=rf"no implementation of {fake_op} \(available: torch\)"):
            R.select(fake_op, torch.device("cpu"))
