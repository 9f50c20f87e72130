"""Normalise, modulate, activate: ``y = act(norm(x) * (1 + scale) + shift)``.

``kind``:
- ``"layer"`` / ``"rms"``: x is tokens (B, T, D) with shift/scale (B, D) broadcast over T, or rows
  (N, D) with shift/scale (N, D); statistics over D.
- ``"group"``: x is (B, C, L) with shift/scale (B, C) broadcast over L; statistics over each of
  ``num_groups`` groups of C / num_groups channels times L.

``weight``/``bias`` are the norm's own affine (D,) or (C,), applied before the modulation; shift
and scale may be None (a plain norm). Statistics are computed in fp32 and the result is cast back
to x's dtype. ``act``: None, ``"silu"`` or ``"gelu_tanh"``.

Under autocast the op does what the built-in norms do: on CUDA they are on autocast's fp32 list,
so a bf16/fp16 x is normalised and returned in fp32; CPU autocast leaves them (and this op) in
x's dtype. ``gated_residual_norm_modulate`` follows the unfused chain the same way.

Contract: fp32 within 1e-5 relative of this reference; bf16/fp16 within Liger-style tolerances.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _ext, _triton
from . import _validate as V
from ._registry import register, select
from ._spec import KernelSpec, acc_dtype, empty, empty_or_absent, grad_or_none

OP = "norm_modulate"
KINDS = ("layer", "rms", "group")
ACTS = (None, "silu", "gelu_tanh")


def apply_act(y: torch.Tensor, act: str | None) -> torch.Tensor:
    if act == "silu":
        return F.silu(y)
    if act == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    return y


@register(OP, "torch")
def norm_modulate_reference(x, shift, scale, kind, weight, bias, eps, act, num_groups):
    xf = V.upcast(x)
    # Parameters of another float dtype than x are fine here, but the built-in norms insist on one.
    w = None if weight is None else weight.to(xf.dtype)
    b = None if bias is None else bias.to(xf.dtype)
    if kind == "layer":
        y = F.layer_norm(xf, (x.shape[-1],), w, b, eps)
    elif kind == "rms":
        y = F.rms_norm(xf, (x.shape[-1],), w, eps)
        if b is not None:
            y = y + b
    else:
        # torch.group_norm, not F.group_norm: the latter refuses a batch with one value per group
        # ("when training"), which the fused kernels take (each value normalises to 0).
        y = torch.group_norm(xf, num_groups, w, b, eps, torch.backends.cudnn.enabled)
    # Modulation is per sample: (B, D) broadcast over T, (B, C) over L, or (N, D) row by row.
    if kind == "group":
        mod_view = (x.shape[0], x.shape[1], 1)
    elif x.dim() == 3:
        mod_view = (x.shape[0], 1, x.shape[2])
    else:
        mod_view = tuple(x.shape)
    if scale is not None:
        y = y * (1.0 + V.upcast(scale).reshape(mod_view))
    if shift is not None:
        y = y + V.upcast(shift).reshape(mod_view)
    return apply_act(y, act).to(x.dtype)


# ---------------------------------------------------------------- the kernel-level ops, written once
def _stats_shape(x, kind, num_groups):
    return (x.shape[0], num_groups) if kind == "group" else (x.numel() // x.shape[-1],)


def _fake(x, shift, scale, weight, bias, kind, eps, act, num_groups):
    stats = _stats_shape(x, kind, num_groups)
    acc = acc_dtype(x)
    return empty(x), x.new_empty(stats, dtype=acc), x.new_empty(stats, dtype=acc)


def _backward_fake(dy, x, mean, rstd, shift, scale, weight, bias, kind, act, num_groups):
    return (empty(x), *(empty_or_absent(t, x) for t in (shift, scale, weight, bias)))


def _setup(ctx, inputs, output):
    x, shift, scale, weight, bias, kind, _eps, act, num_groups = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(x, output[1], output[2], shift, scale, weight, bias)
    ctx.args = (kind, act, num_groups)


def _derivative(backward_op):
    def backward(ctx, dy, _dmean, _drstd):
        x, mean, rstd, shift, scale, weight, bias = ctx.saved_tensors
        grads = backward_op(dy, x, mean, rstd, shift, scale, weight, bias, *ctx.args)
        need = ctx.needs_input_grad
        return (grads[0] if need[0] else None, *(grad_or_none(g, n) for g, n in zip(grads[1:], need[1:5])),
                None, None, None, None)
    return backward


BACKWARD = KernelSpec(
    "norm_modulate_backward",
    "(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor? shift, Tensor? scale, Tensor? weight, "
    "Tensor? bias, str kind, str act, int num_groups) -> (Tensor dx, Tensor dshift, Tensor dscale, "
    "Tensor dweight, Tensor dbias)", _backward_fake)
FORWARD = KernelSpec(
    "norm_modulate",
    "(Tensor x, Tensor? shift, Tensor? scale, Tensor? weight, Tensor? bias, str kind, float eps, str act, "
    "int num_groups) -> (Tensor y, Tensor mean, Tensor rstd)", _fake, _setup, _derivative, BACKWARD)

# Where each fused backend runs, and its rank there (higher wins; the reference is 0).
# cpp: benchmarks/results/cpu-2core.md (AVX-512) and cpu-avx2-2core.md (avx2 variant). cuda over
# triton on GPUs: at the model's sizes host time per call decides (benchmarks/results/h200/host.log).
RANKS = {"cpp": {"cpu": 1}, "cuda": {"cuda": 2}, "triton": {"cuda": 1}}


def _groups(kind, num_groups):
    return num_groups if kind == "group" else 1


# ---------------------------------------------------------------- compiled (cpp / cuda) backends
_ext.bind(BACKWARD)
if (_compiled := _ext.bind(FORWARD)) is not None:
    def _norm_modulate_compiled(x, shift, scale, kind, weight, bias, eps, act, num_groups):
        return _compiled(x, shift, scale, weight, bias, kind, eps, act or "none", _groups(kind, num_groups))[0]

    _ext.register_compiled(OP, FORWARD.name, _norm_modulate_compiled, RANKS)


# ---------------------------------------------------------------- triton backend
if _triton.available():
    _tr_backward = _triton.bind(BACKWARD, _triton.launcher("norm_modulate", "backward"))
    _tr_forward = _triton.bind(FORWARD, _triton.launcher("norm_modulate", "forward"), _tr_backward)

    def _norm_modulate_triton(x, shift, scale, kind, weight, bias, eps, act, num_groups):
        return _tr_forward(x, shift, scale, weight, bias, kind, eps, act or "none", _groups(kind, num_groups))[0]

    _triton.register_triton(OP, _norm_modulate_triton, RANKS["triton"])


def validate(x, shift, scale, kind, weight, bias, eps, act, num_groups, x_name="x"):
    V.choice("kind", kind, KINDS)
    V.choice("act", act, ACTS)
    V.positive_float("eps", eps)
    if kind == "group":
        V.tensor(x_name, x, 3)
        feat, mod_shape, what = x.shape[1], (x.shape[0], x.shape[1]), "(B, C) broadcast over L"
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
        if feat % num_groups:
            raise ValueError(f"num_groups={num_groups} must divide the {feat} channels of {x_name}")
    else:
        V.tensor(x_name, x, (2, 3))
        feat = x.shape[-1]
        mod_shape, what = (x.shape[0], feat), ("(B, D) broadcast over T" if x.dim() == 3 else "(N, D)")
    for name, m in (("shift", shift), ("scale", scale)):
        if m is not None:
            V.tensor(name, m, 2)
            V.shape(name, m, mod_shape, what)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            V.tensor(name, p, 1)
            V.shape(name, p, (feat,), "one per normalised feature")
    V.same_device(x_name, x, shift=shift, scale=scale, weight=weight, bias=bias)


def norm_modulate(x, shift=None, scale=None, kind="layer", weight=None, bias=None, eps=1e-6,
                  act=None, num_groups=32):
    """``act(norm(x) * (1 + scale) + shift)``; see the module docstring for shapes."""
    validate(x, shift, scale, kind, weight, bias, eps, act, num_groups)
    if V.norm_autocasts_to_fp32(x.device.type) and x.dtype != torch.float32 and x.dtype != torch.float64:
        x = x.float()  # as F.layer_norm / group_norm under CUDA autocast: computed and returned in fp32
    impl = select(OP, x)
    return impl.fn(x, shift, scale, kind, weight, bias, float(eps), act, num_groups)
