"""Second-order gradients: the reference backend supports them (plain autograd, gradgradcheck);
the fused backends' backward kernels have no derivative, so create_graph=True through them raises
a clear error instead of torch's fallback (a warning and zero second-order gradients)."""
from __future__ import annotations

import pytest
import torch

from flowfm_fast import _backend

from flowfm_fast import ops
from flowfm_fast.ops import use_backend
from naive import backend_params

D64 = dict(dtype=torch.float64)


def _leaf(*shape, scale=1.0):
    return (scale * torch.randn(*shape, **D64)).requires_grad_(True)


def _cases():
    torch.manual_seed(0)
    x, h = _leaf(2, 3, 5), _leaf(2, 3, 5)
    shift, scale, gate = _leaf(2, 5, scale=0.3), _leaf(2, 5, scale=0.3), _leaf(2, 5, scale=0.3)
    x0, x1, v = _leaf(2, 3, 4), _leaf(2, 3, 4), _leaf(2, 3, 4)
    t = torch.rand(2, **D64).mul(0.8).add(0.1).requires_grad_(True)
    return {
        "norm_modulate": (lambda x, s, c: ops.norm_modulate(x, s, c, "layer", act="silu"), (x, shift, scale)),
        "gated_residual": (lambda r, h, g: ops.gated_residual(r, h, g), (x, h, gate)),
        "gated_residual_norm_modulate": (
            lambda r, h, g, s, c: ops.gated_residual_norm_modulate(r, h, g, s, c, "layer")[1], (x, h, gate, shift, scale)),
        "fm_interpolate": (lambda a, b, t: ops.fm_interpolate(a, b, t)[0], (x0, x1, t)),
        "fm_loss": (lambda v, a, b, t: ops.fm_loss(v, a, b, t), (v, x0, x1, t)),
        "timestep_embedding": (lambda t: ops.timestep_embedding(t, 6), (t,)),
        "linear_act": (lambda x, w, b: ops.linear_act(x, w, b, "gelu_tanh"), (x, _leaf(4, 5), _leaf(4))),
        "attention": (lambda q, k, v: ops.attention(q, k, v), (_leaf(1, 2, 3, 4), _leaf(1, 2, 3, 4), _leaf(1, 2, 3, 4))),
        "batch_norm_act": (lambda x, w, b: ops.batch_norm_act(x, None, None, w, b, True, act="relu"),
                           (x, _leaf(3), _leaf(3))),
    }


@pytest.mark.parametrize("op", list(_cases()))
def test_second_order(op):
    fn, inputs = _cases()[op]
    from flowfm_fast.ops import _registry
    for backend in [b.values[0] for b in backend_params(op)]:
        with use_backend(backend):
            # linear_act's triton entry is the reference itself (see its module doc).
            if backend == "torch" or _registry._IMPLS[op][backend].fn is _registry._IMPLS[op]["torch"].fn:
                # A true second derivative, checked numerically (timestep_embedding's reference
                # computes in fp32 by contract: too coarse for gradgradcheck; attention's is torch's
                # SDPA, whose CPU flash backward has no derivative in torch itself).
                if op not in ("timestep_embedding", "attention"):
                    assert torch.autograd.gradgradcheck(fn, inputs)
                continue
            if any(t.device.type != "cpu" for t in inputs) or (backend == "triton" and not _triton_ok()):
                continue
            if op == "linear_act" and backend == "cpp":
                continue  # this small a GEMM runs the reference on cpp (test_linear_act checks the big ones)
            out = fn(*inputs)
            with pytest.raises(RuntimeError, match="no derivative"):
                torch.autograd.grad(out.pow(2).sum(), inputs, create_graph=True)


def _triton_ok():
    from flowfm_fast.ops import _triton
    return _backend.interpreting()
