"""Under autocast the norm ops return what the built-in norms return, on every backend."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flowfm_fast import ops
from flowfm_fast.ops import _validate
from naive import backend_params

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=backend_params("norm_modulate"))
def backend(request):
    with ops.use_backend(request.param):
        yield request.param


def _inputs(device, dtype=torch.bfloat16):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, device=device).to(dtype)
    mod = (0.1 * torch.randn(3, 16, device=device)).to(dtype)
    return x, mod


@pytest.mark.parametrize("device", DEVICES)
def test_norm_modulate_dtype_matches_builtin_layer_norm(backend, device):
    x, mod = _inputs(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        want = F.layer_norm(x, (16,), eps=1e-6)
        try:
            got = ops.norm_modulate(x, None, None, "layer", eps=1e-6)
        except RuntimeError as exc:  # a forced backend that cannot take this device
            pytest.skip(str(exc))
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_cuda_autocast_rule_upcasts_on_every_backend(backend, monkeypatch):
    """The CUDA rule (norms in fp32), forced on for the backend's default device (CPU without a
    GPU): output fp32, values of the fp32 op."""
    monkeypatch.setattr(_validate, "norm_autocasts_to_fp32", lambda device_type: True)
    x, mod = _inputs(None)
    y = ops.norm_modulate(x, mod, mod, "layer", act="silu")
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ops.norm_modulate(x.float(), mod, mod, "layer", act="silu"), rtol=0, atol=0)
    if backend in ops.backends_for("gated_residual_norm_modulate"):  # the cuda backend has no fused residual
        res, y2 = ops.gated_residual_norm_modulate(x, x, mod, mod, mod, "layer")
        assert res.dtype == torch.bfloat16 and y2.dtype == torch.float32


def test_no_autocast_keeps_input_dtype(backend):
    x, mod = _inputs(None)
    assert ops.norm_modulate(x, mod, mod, "layer").dtype == torch.bfloat16
