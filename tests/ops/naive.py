"""Independent naive float64 formulas used as the oracle for the ``flowfm_fast.ops`` tests.

Nothing here calls the package, ``torch.nn.functional`` norms or activations: statistics are
computed by hand (per row / per group), activations from their closed forms, and the timestep
table element by element with :mod:`math`. The torch versions are plain float64 tensor
arithmetic so autograd can differentiate through them for the gradient comparisons.
"""
from __future__ import annotations

import math

import pytest
import torch

from flowfm_fast.ops import backends_for, use_backend

# Tolerances (rtol, atol) per input dtype against the float64 naive formula.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}
LOW_PRECISION = (torch.bfloat16, torch.float16)



def assert_float64_precision(actual, expected):
    """Precondition of every float64 gradcheck: the op really computes in float64.

    Checked first because a failing gradcheck spends seconds formatting its Jacobians."""
    torch.testing.assert_close(actual.detach().double().cpu(), expected.detach().double().cpu(), rtol=1e-10, atol=1e-10)


def backend_params(op: str):
    """One pytest param per registered backend of ``op`` (only ``torch`` today)."""
    return [pytest.param(b, id=f"backend={b}") for b in backends_for(op)]


def forced(backend: str):
    return use_backend(backend)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    """Compare ``actual`` (any dtype) to the float64 ``expected`` with ``dtype``'s tolerance."""
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.detach().double().cpu(), expected.detach().double().cpu(),
                               rtol=rtol * scale, atol=atol * scale)


def d64(t: torch.Tensor | None, grad: bool = False) -> torch.Tensor | None:
    """A float64 leaf copy of ``t`` (exactly the values ``t`` holds, low precision included)."""
    if t is None:
        return None
    out = t.detach().to(torch.float64).clone()
    return out.requires_grad_(grad)


# ----------------------------------------------------------------------------- activations


def naive_act(y: torch.Tensor, act: str | None) -> torch.Tensor:
    if act is None:
        return y
    if act == "silu":
        return y / (1.0 + torch.exp(-y))
    if act == "gelu_tanh":
        c = math.sqrt(2.0 / math.pi)
        return 0.5 * y * (1.0 + torch.tanh(c * (y + 0.044715 * y * y * y)))
    raise AssertionError(act)


# ----------------------------------------------------------------------------- norms


def naive_layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-row statistics over the last axis, biased variance."""
    d = x.shape[-1]
    mean = x.sum(dim=-1, keepdim=True) / d
    centered = x - mean
    var = (centered * centered).sum(dim=-1, keepdim=True) / d
    return centered / torch.sqrt(var + eps)


def naive_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    d = x.shape[-1]
    ms = (x * x).sum(dim=-1, keepdim=True) / d
    return x / torch.sqrt(ms + eps)


def naive_group_norm(x: torch.Tensor, num_groups: int, eps: float) -> torch.Tensor:
    """x (B, C, L): each group of C // num_groups channels times L gets its own mean/var."""
    b, c, l = x.shape
    cg = c // num_groups
    pieces = []
    for g in range(num_groups):
        xg = x[:, g * cg:(g + 1) * cg, :]
        n = cg * l
        mean = xg.sum(dim=(1, 2), keepdim=True) / n
        centered = xg - mean
        var = (centered * centered).sum(dim=(1, 2), keepdim=True) / n
        pieces.append(centered / torch.sqrt(var + eps))
    return torch.cat(pieces, dim=1)


def naive_norm_modulate(x, shift=None, scale=None, kind="layer", weight=None, bias=None, eps=1e-6,
                        act=None, num_groups=32):
    """``act((norm(x) * weight + bias) * (1 + scale) + shift)`` in float64."""
    x = x.double()
    if kind == "layer":
        y = naive_layer_norm(x, eps)
    elif kind == "rms":
        y = naive_rms_norm(x, eps)
    elif kind == "group":
        y = naive_group_norm(x, num_groups, eps)
    else:
        raise AssertionError(kind)
    # The norm's own affine: one value per normalised feature (last axis, or channels for group).
    if kind == "group":
        feat_view = (1, x.shape[1], 1)
        mod = lambda m: m.double()[:, :, None]  # (B, C) over L  # noqa: E731
    elif x.dim() == 3:
        feat_view = (1, 1, x.shape[2])
        mod = lambda m: m.double()[:, None, :]  # (B, D) over T  # noqa: E731
    else:
        feat_view = (1, x.shape[1])
        mod = lambda m: m.double()  # (N, D) row by row  # noqa: E731
    if weight is not None:
        y = y * weight.double().reshape(feat_view)
    if bias is not None:
        y = y + bias.double().reshape(feat_view)
    if scale is not None:
        y = y * (1.0 + mod(scale))
    if shift is not None:
        y = y + mod(shift)
    return naive_act(y, act)


def naive_gated_residual(res, h, gate):
    g = gate.double()
    if res.dim() == 3:
        g = g[:, None, :]
    return res.double() + g * h.double()


# ----------------------------------------------------------------------------- timestep embedding


def naive_timestep_embedding(t, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Element by element: row i = [cos(t_i f_0..), sin(t_i f_0..), (0 if dim odd)]."""
    values = [float(v) for v in t.detach().double().tolist()]
    half = dim // 2
    out = torch.zeros(len(values), dim, dtype=torch.float64)
    for i, ti in enumerate(values):
        for k in range(half):
            freq = math.exp(-math.log(max_period) * k / half)
            out[i, k] = math.cos(ti * freq)
            out[i, half + k] = math.sin(ti * freq)
    return out


# ----------------------------------------------------------------------------- flow matching


def naive_fm_path(x0, x1, t, sigma_min: float = 0.0):
    """x_t = (1 - (1 - s) t) x0 + t x1 and u_t = x1 - (1 - s) x0, t broadcast per sample."""
    x0, x1 = x0.double(), x1.double()
    tb = t.double().reshape(t.shape[0], *([1] * (x1.dim() - 1)))
    x_t = (1.0 - (1.0 - sigma_min) * tb) * x0 + tb * x1
    u_t = x1 - (1.0 - sigma_min) * x0
    return x_t, u_t


def naive_fm_loss(v, x0, x1, weight=None, sigma_min: float = 0.0):
    """mean_b w_b * mean_{C,L} (v - u_t)^2."""
    u_t = x1.double() - (1.0 - sigma_min) * x0.double()
    diff = v.double() - u_t
    b = v.shape[0]
    per_sample = (diff * diff).reshape(b, -1).sum(dim=1) / diff[0].numel()
    if weight is not None:
        per_sample = per_sample * weight.double()
    return per_sample.sum() / b
