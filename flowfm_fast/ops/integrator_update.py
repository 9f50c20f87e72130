"""Integrator updates: the in-place Euler step ``x += dt * v`` and the multi-stage combine
``out = x + dt * sum_i b_i k_i`` (Runge-Kutta stage inputs and the final update alike).

Both are exact elementwise formulas; ``out`` may be ``x`` itself (in-place update).
Contract: fp32 within 1e-6 relative of this reference (summation order is fixed: k_0 first).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from . import _ext, _triton
from . import _validate as V
from ._registry import register, select
from ._spec import KernelSpec, needs_grad

OP_EULER = "euler_step_"
OP_COMBINE = "rk_combine"


@register(OP_EULER, "torch")
def euler_step_reference_(x, v, dt):
    return x.add_(v, alpha=dt)


@register(OP_COMBINE, "torch")
def rk_combine_reference(x, dt, ks, bs, out):
    terms = [(k, b) for k, b in zip(ks, bs) if b != 0.0]
    if out is None and torch.is_grad_enabled() and any(t.requires_grad for t in (x, *ks)):
        # out= writes are not differentiable: the same sum, out of place, for autograd.
        y = x
        for k, b in terms:
            y = torch.add(y, k, alpha=dt * b)
        return y.to(x.dtype) if terms else x.clone()
    if out is None:
        out = torch.empty_like(x)
    if not terms:
        return out.copy_(x)
    # out doubling as a stage read after the first write would be read already overwritten.
    # Skipped while torch.compile traces (it cannot read storage pointers): compiled callers must not
    # pass an out that is also a later stage.
    if not torch.compiler.is_compiling() and any(
            k.untyped_storage().data_ptr() == out.untyped_storage().data_ptr() for k, _ in terms[1:]):
        return out.copy_(rk_combine_reference(x, dt, ks, bs, None))
    k0, b0 = terms[0]
    torch.add(x, k0, alpha=dt * b0, out=out)
    for k, b in terms[1:]:
        out.add_(k, alpha=dt * b)
    return out


# ---------------------------------------------------------------- the kernel-level ops, written once
def _no_output(*_args):
    return None


EULER = KernelSpec("euler_step_", "(Tensor(a!) x, Tensor v, float dt) -> ()", _no_output, mutates_args=("x",))
COMBINE = KernelSpec("rk_combine", "(Tensor(a!) out, Tensor x, Tensor[] ks, float[] bs, float dt) -> ()",
                     _no_output, mutates_args=("out",))

# The in-place updates are for solvers (no autograd): the fused backends serve only calls whose
# inputs need no gradient (call flag: needs_grad); the reference's add_ is what autograd understands.
# cpp: benchmarks/results/cpu-2core.md (AVX-512) and cpu-avx2-2core.md (avx2 variant); cuda over
# triton on GPUs: host time per call (benchmarks/results/h200/host.log).
RANKS = {"cpp": {"cpu": 1}, "cuda": {"cuda": 2}, "triton": {"cuda": 1}}


def _without_grad(flags) -> bool:
    return not flags[0]


def _make_combine(kernel):
    def combine(x, dt, ks, bs, out):
        if out is None:
            out = torch.empty_like(x)
        kernel(out, x, ks, bs, dt)
        return out
    return combine


def _make_euler(kernel):
    def euler(x, v, dt):
        kernel(x, v, dt)
        return x
    return euler


# ---------------------------------------------------------------- compiled (cpp / cuda) backends
if (_euler_op := _ext.bind(EULER)) is not None:
    _ext.register_compiled(OP_EULER, EULER.name, _make_euler(_euler_op), RANKS, _without_grad)
if (_combine_op := _ext.bind(COMBINE)) is not None:
    _ext.register_compiled(OP_COMBINE, COMBINE.name, _make_combine(_combine_op), RANKS, _without_grad)


# ---------------------------------------------------------------- triton backend
if _triton.available():
    _triton.register_triton(OP_EULER, _make_euler(_triton.bind(EULER, _triton.launcher("integrator_update", "euler_step_"))),
                            RANKS["triton"], _without_grad)
    _triton.register_triton(OP_COMBINE, _make_combine(_triton.bind(COMBINE, _triton.launcher("integrator_update", "rk_combine"))),
                            RANKS["triton"], _without_grad)


def _dt(dt) -> float:
    if isinstance(dt, bool) or not isinstance(dt, (int, float)):
        raise TypeError(f"dt must be a float, got {type(dt).__name__}")
    if not math.isfinite(dt):
        raise ValueError(f"dt must be finite, got {dt}")
    return float(dt)


def euler_step_(x: torch.Tensor, v: torch.Tensor, dt: float) -> torch.Tensor:
    """``x += dt * v`` in place; returns x."""
    V.tensor("x", x)
    V.tensor("v", v)
    V.shape("v", v, x.shape, "same as x")
    V.same_device("x", x, v=v)
    V.written_in_place("x", x)
    V.no_partial_overlap("x", x, v=v)
    return select(OP_EULER, x, (needs_grad(x, v),)).fn(x, v, _dt(dt))


def rk_combine(x: torch.Tensor, dt: float, ks: Sequence[torch.Tensor], bs: Sequence[float],
               out: torch.Tensor | None = None) -> torch.Tensor:
    """``x + dt * sum_i bs[i] * ks[i]`` written to ``out`` (new tensor when None; may be x).

    Differentiable with ``out=None``; ``out=`` writes record no gradients, so they are refused
    while x or ks require grad (under grad mode)."""
    V.tensor("x", x)
    if len(ks) == 0 or len(ks) != len(bs):
        raise ValueError(f"ks and bs must be non-empty and of equal length, got {len(ks)} and {len(bs)}")
    for i, k in enumerate(ks):
        V.tensor(f"ks[{i}]", k)
        V.shape(f"ks[{i}]", k, x.shape, "same as x")
        V.same_device("x", x, **{f"ks[{i}]": k})
    if not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bs):
        raise TypeError(f"bs must be floats, got {[type(b).__name__ for b in bs]}")
    bs = [float(b) for b in bs]
    if not all(math.isfinite(b) for b in bs):
        raise ValueError(f"bs must be finite, got {bs}")
    if out is not None:
        V.tensor("out", out)
        V.shape("out", out, x.shape, "same as x")
        V.same_device("x", x, out=out)
        V.written_in_place("out", out)
        V.no_partial_overlap("out", out, x=x, **{f"ks[{i}]": k for i, k in enumerate(ks)})
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *ks)):
            raise ValueError("rk_combine(out=...) cannot record gradients (x or ks require grad): "
                             "pass out=None, or call under torch.no_grad()")
    return select(OP_COMBINE, x, (needs_grad(x, *ks),)).fn(x, _dt(dt), list(ks), bs, out)
