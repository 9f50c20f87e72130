"""Batch norm with a fused activation: ``y = act(batch_norm(x))``, as ``F.batch_norm`` then ``act``.

x is (B, C) or (B, C, L); statistics per channel over B (and L). ``training=True`` normalises with
the batch's statistics and, when running_mean / running_var are given, updates them in place
(``(1 - momentum) * running + momentum * batch``, the variance unbiased), as ``F.batch_norm``
does; ``training=False`` normalises with the running ones. ``weight`` / ``bias`` (C,) are the
affine. ``act``: None or ``"relu"`` (the encoder's pre-activation blocks).

The ``cpp`` backend reduces each channel in one task (two vectorised passes) and applies the affine
and ReLU in the same pass as the normalisation: ATen's CPU batch norm gathers training statistics
with a per-element Welford update, ~10x the time of the ReLU that follows it at the encoder's
sizes. Statistics in fp32 (float64 for float64 x); y in x's dtype.

Contract: fp32 within 1e-5 relative of this reference; bf16/fp16 within their rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _ext, _triton
from . import _validate as V
from ._registry import register, select
from ._spec import KernelSpec, acc_dtype, empty

OP = "batch_norm_act"
ACTS = (None, "relu")


@register(OP, "torch")
def batch_norm_act_reference(x, running_mean, running_var, weight, bias, training, momentum, eps, act):
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return torch.relu(y) if act == "relu" else y


# ---------------------------------------------------------------- compiled (cpp) backend
def _fake(x, weight, bias, running_mean, running_var, training, eps, act):
    acc, c = acc_dtype(x), x.shape[1]
    return (empty(x), x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc),
            x.new_empty((c,) if training else (0,), dtype=acc))


def _backward_fake(dy, x, mean, rstd, weight, bias, training, act, need_x):
    none = x.new_empty((0,))
    return (empty(x) if need_x else none, none if weight is None else weight.new_empty(weight.shape),
            none if bias is None else bias.new_empty(bias.shape))


# The C++ extension's ops only (autograd in csrc/batch_norm_act/autograd.cpp); no Triton kernel.
BACKWARD = KernelSpec("batch_norm_act_backward",
                      "(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias, "
                      "bool training, str act, bool need_x) -> (Tensor dx, Tensor dweight, Tensor dbias)",
                      _backward_fake)
FORWARD = KernelSpec("batch_norm_act",
                     "(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
                     "bool training, float eps, str act) -> (Tensor y, Tensor mean, Tensor rstd, "
                     "Tensor var_unbiased)", _fake, backward=BACKWARD)

# cpp: benchmarks/results/cpu-2core.md (AVX-512) and cpu-avx2-2core.md (avx2 variant). On GPUs the
# "triton" backend is the reference (cuDNN's batch norm), ranked as the reference.
RANKS = {"cpp": {"cpu": 1}, "triton": {"cuda": 0}}

_ext.bind(BACKWARD)
if (_compiled := _ext.bind(FORWARD)) is not None:
    def _batch_norm_act_compiled(x, running_mean, running_var, weight, bias, training, momentum, eps, act):
        y, mean, _rstd, var_unbiased = _compiled(
            x, weight, bias, running_mean, running_var, training, eps, act or "none")
        if training and running_mean is not None:
            with torch.no_grad():  # F.batch_norm's running update, outside the kernel, in one call
                torch._foreach_lerp_([running_mean, running_var], [mean.to(running_mean.dtype),
                                                                   var_unbiased.to(running_var.dtype)], momentum)
        return y

    _ext.register_compiled(OP, FORWARD.name, _batch_norm_act_compiled, RANKS)

# The triton backend runs the reference (no Triton kernel: the encoder's batch norm is cuDNN's on a
# GPU); registered so that a model run under use_backend("triton") works end to end.
_triton.register_triton(OP, batch_norm_act_reference, RANKS["triton"])


def validate(x, running_mean, running_var, weight, bias, training, momentum, eps, act):
    V.choice("act", act, ACTS)
    V.tensor("x", x, (2, 3))
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must be a float in [0, 1], got {momentum!r}")
    V.positive_float("eps", eps)
    c = x.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        if t is not None:
            V.tensor(name, t, 1)
            V.shape(name, t, (c,), "one per channel")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if not training and running_mean is None:
        raise ValueError("training=False normalises with running_mean / running_var: pass them")
    if training and x.numel() // c == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got x of shape {tuple(x.shape)}")
    V.same_device("x", x, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)


def batch_norm_act(x, running_mean=None, running_var=None, weight=None, bias=None, training=False,
                   momentum=0.1, eps=1e-5, act=None) -> torch.Tensor:
    """``act(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps))``."""
    if isinstance(x, torch.Tensor) and x.numel() == 0:  # an empty batch: F.batch_norm's own answer or error
        return batch_norm_act_reference(x, running_mean, running_var, weight, bias, training, momentum, eps, act)
    validate(x, running_mean, running_var, weight, bias, training, momentum, eps, act)
    impl = select(OP, x)
    return impl.fn(x, running_mean, running_var, weight, bias, training, float(momentum), float(eps), act)
