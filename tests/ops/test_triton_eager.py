"""The Triton ops' eager path (flowfm_fast/ops/_triton.py): in eager mode a call skips the
dispatcher and runs the kernel directly (inside an autograd.Function when a gradient is needed);
anything that must see the registered op (torch.compile, dispatch modes, fake tensors) still does.
On a machine without a GPU these run under TRITON_INTERPRET=1 (tests/conftest.py sets it)."""
from __future__ import annotations

import pytest
import torch

from flowfm_fast import _backend
from torch.utils._python_dispatch import TorchDispatchMode

from flowfm_fast import ops
from flowfm_fast.ops import _triton, use_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(
    not (_triton.available() and (DEVICE == "cuda" or _backend.interpreting())),
    reason="triton is not installed, or no GPU and TRITON_INTERPRET is not 1")


def _step(model, x1):
    model.zero_grad(set_to_none=True)
    with use_backend("triton"):
        loss = model.loss(x1, generator=torch.Generator(device=DEVICE).manual_seed(3))
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("velocity", ["dit", "resnet"])
def test_eager_path_equals_registered_op(velocity, monkeypatch):
    """A whole training step through the eager path and through the registered ops (the path
    torch.compile takes) runs the same kernels: loss and every gradient are identical."""
    from flowfm_fast.models import FlowFM, get_config
    torch.manual_seed(0)
    model = FlowFM(get_config("tiny", length=60, velocity=velocity)).to(DEVICE)
    with torch.no_grad():  # adaLN-Zero starts at zero: perturb so every path carries gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x1 = torch.randn(4, 3, 60, device=DEVICE)
    calls = []
    real = _triton.TritonOp._call
    monkeypatch.setattr(_triton.TritonOp, "_call", lambda self, fn, args: calls.append(self.qualname) or real(self, fn, args))
    loss_e, grads_e = _step(model, x1)
    assert "flowfm_triton::norm_modulate" in calls and any(c.endswith("_backward") for c in calls)
    monkeypatch.setattr(_triton, "_eager_ok", lambda args: False)
    calls.clear()
    loss_d, grads_d = _step(model, x1)
    assert calls == []  # every call went through the dispatcher this time
    assert torch.equal(loss_e, loss_d)
    for name in grads_d:
        assert torch.equal(grads_e[name], grads_d[name]), name


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_and_fake_tensors_get_the_registered_op():
    x = torch.randn(3, 5, 8, device=DEVICE, requires_grad=True)
    shift = torch.randn(3, 8, device=DEVICE, requires_grad=True)
    with use_backend("triton"), _Recorder() as rec:
        y = ops.norm_modulate(x, shift, None, "layer")
    assert any("flowfm_triton.norm_modulate" in s for s in rec.seen)
    with use_backend("triton"), _Recorder() as rec:
        y.sum().backward()
    assert any("flowfm_triton.norm_modulate_backward" in s for s in rec.seen)
    assert x.grad is not None and shift.grad is not None

    from torch._subclasses.fake_tensor import FakeTensorMode
    mode = FakeTensorMode()
    xf, shift_f = mode.from_tensor(x.detach()), mode.from_tensor(shift.detach())
    with mode, use_backend("triton"):
        yf = ops.norm_modulate(xf, shift_f, None, "layer")
    assert yf.shape == x.shape and type(yf).__name__ == "FakeTensor"


def test_in_place_updates_bump_the_version_counter():
    x, v = torch.randn(4, 3, 10, device=DEVICE), torch.randn(4, 3, 10, device=DEVICE)
    expected = x + 0.25 * v
    before = x._version
    with use_backend("triton"), torch.no_grad():
        ops.euler_step_(x, v, 0.25)
    assert x._version > before
    torch.testing.assert_close(x, expected)


def test_no_derivative_raises_instead_of_zero_gradients():
    """The backward kernels have no derivative of their own: a second-order gradient through the
    triton backend raises (torch's fallback would warn and return zeros)."""
    x = torch.randn(3, 5, 8, device=DEVICE, requires_grad=True)
    with use_backend("triton"):
        y = ops.norm_modulate(x, None, None, "layer", act="silu")
        with pytest.raises(RuntimeError, match="no derivative"):
            torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)


def test_profiler_names_the_op():
    x = torch.randn(3, 5, 8, device=DEVICE, requires_grad=True)
    with use_backend("triton"), torch.profiler.profile() as prof:
        ops.norm_modulate(x, None, None, "layer").sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert "flowfm_triton::norm_modulate" in names
    assert "flowfm_triton::norm_modulate_backward" in names
