"""NVTX ranges (:mod:`flowfm_fast.nvtx`: no-ops unless FLOWFM_NVTX=1 and CUDA; where the model code
puts them; traceable by torch.compile) and ``flowfm-fast profile`` (:mod:`flowfm_fast.profiling`)."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from flowfm_fast import nvtx, profiling
from flowfm_fast.cli import main
from flowfm_fast.models import FlowFM, get_config
from flowfm_fast.nvtx import nvtx_range, nvtx_wrap, refresh_nvtx


@pytest.fixture
def nvtx_env(monkeypatch):
    """Set FLOWFM_NVTX for one test and restore the module's switch afterwards."""
    def set_env(value):
        if value is None:
            monkeypatch.delenv(nvtx.ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(nvtx.ENV_VAR, value)
        return refresh_nvtx()
    yield set_env
    monkeypatch.undo()
    refresh_nvtx()


@pytest.fixture
def recorded(monkeypatch):
    """Ranges switched on with torch.cuda.nvtx replaced by a recorder (runs without a GPU)."""
    calls = []
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: calls.append(("push", name)))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: calls.append(("pop", None)))
    monkeypatch.setattr(nvtx, "_ENABLED", True)
    return calls


def pushed(calls):
    return [name for op, name in calls if op == "push"]


def balanced(calls) -> bool:
    depth = 0
    for op, _ in calls:
        depth += 1 if op == "push" else -1
        if depth < 0:
            return False
    return depth == 0


def test_nvtx_range_is_a_shared_noop_when_off(nvtx_env):
    assert nvtx_env(None) is False
    assert nvtx_range("a") is nvtx_range("b")            # no allocation on the disabled path

    @nvtx_wrap("f")
    def f(x, y=1):
        return x + y
    with nvtx_range("a"):
        assert f(1, y=2) == 3
    assert f.__name__ == "f"


def test_nvtx_env_on_cpu_never_errors(nvtx_env):
    """FLOWFM_NVTX=1 without CUDA (here a CPU-only build): still a no-op, and a model runs under it."""
    on = nvtx_env("1")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the ranges are really on")
    assert on is False and not nvtx.nvtx_enabled()
    model = FlowFM(get_config("tiny"))
    x = torch.randn(2, 3, 300)
    with nvtx_range("outer"):
        model.loss(x).backward()
        assert model.sample(model.encode(x), steps=2).shape == x.shape


def test_env_values(nvtx_env, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert nvtx_env("1") and nvtx_env("on")
    assert not nvtx_env("0") and not nvtx_env("")


def test_ranges_where_the_model_code_puts_them(recorded):
    torch.manual_seed(0)
    model = FlowFM(get_config("tiny"))
    x = torch.randn(2, 3, 300)
    model.loss(x).backward()
    names = pushed(recorded)
    assert names == ["flowfm.loss", "encoder", "dit.block0", "dit.block1"] and balanced(recorded)

    recorded.clear()
    model.eval()
    model.sample(model.encode(x), steps=2, method="midpoint", graph=False)
    assert pushed(recorded) == ["encoder", "integrate.prepare",
                                "integrate.step0", *["dit.block0", "dit.block1"] * 2,
                                "integrate.step1", *["dit.block0", "dit.block1"] * 2]
    assert balanced(recorded)

    recorded.clear()
    gen = FlowFM(get_config("tiny", velocity="resnet")).velocity
    gen(x, torch.rand(2), torch.randn(2, 16))
    assert pushed(recorded) == ["resnet.block0", "resnet.block1"] and balanced(recorded)


def test_range_pops_on_exception(recorded):
    with pytest.raises(RuntimeError):
        with nvtx_range("boom"):
            raise RuntimeError("x")
    assert recorded == [("push", "boom"), ("pop", None)]


@pytest.mark.parametrize("on", [False, True], ids=["nvtx_off", "nvtx_on"])
def test_compile_fullgraph_over_ranged_blocks(on, monkeypatch):
    """Dynamo traces the ranges without a graph break: the no-op is a nullcontext, and with the
    switch on the ranges step aside while compiling."""
    if on:
        monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: None)
        monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: None)
    monkeypatch.setattr(nvtx, "_ENABLED", on)
    torch.manual_seed(0)
    model = FlowFM(get_config("tiny"))
    net = model.velocity
    x, t, z = torch.randn(2, 3, 300), torch.rand(2), torch.randn(2, 16)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(net, fullgraph=True, backend="eager")     # the DiT blocks' ranges
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, t, z), net(x, t, z))
        # the whole loss: nvtx_wrap("flowfm.loss") around encoder and blocks, and its backward
        loss = torch.compile(model.loss, fullgraph=True, backend="eager")(x)
        loss.backward()
        assert torch.isfinite(loss) and model.encoder.head.weight.grad is not None
    finally:
        torch._dynamo.reset()


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_profile_command_writes_trace_and_top_ops(tmp_path):
    code, out, err = run_cli("profile", "--config", "tiny", "--batch", "4", "--steps", "2", "--sample-steps", "2",
                             "--device", "cpu", "--out", str(tmp_path))
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    trace = json.loads((tmp_path / "trace.json").read_text())
    events = trace["traceEvents"]
    assert events
    names = {e.get("name") for e in events}
    assert {"train.step", "train.backward", "train.optimizer_step", "sample"} <= names
    top = (tmp_path / "top_ops.txt").read_text()
    assert report["top_ops"] == str(tmp_path / "top_ops.txt")
    assert "self CPU time" in top and "aten::" in top


def test_top_ops_table_sorts_by_device_time_too():
    """The CUDA branch's sort key, checked without a GPU (device times are zero here)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.randn(64, 64) @ torch.randn(64, 64)
    text = profiling.top_ops_text(prof.key_averages(), 5, cuda=True)
    assert "by self CPU time" in text and "by self CUDA time" in text and "aten::mm" in text


def test_profile_command_rejects_bad_arguments(tmp_path):
    code, _, err = run_cli("profile", "--config", "tiny", "--steps", "0", "--out", str(tmp_path))
    assert code == 2 and "--steps" in err
    assert not (tmp_path / "trace.json").exists()
