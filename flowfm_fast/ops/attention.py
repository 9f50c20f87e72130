"""Scaled dot-product attention without a mask: ``softmax(q @ k.T / sqrt(hd)) @ v`` per (batch, head).

q, k, v are (B, H, T, hd) with one shape and dtype (a transposed view of a fused qkv projection is
fine: only the last dim needs unit stride). Same result as ``F.scaled_dot_product_attention(q, k, v)``.

The ``cpp`` backend is for short sequences (T <= 512, the DiT's 30 tokens): one task per head with
its tiles in L1 and the softmax probabilities kept for the backward (B H T^2 values, only when a
gradient will be asked for); ATen's CPU
flash kernel is built for long sequences and spent ~3x the time at T = 30. Longer sequences, and
calls under autocast, go to the reference. On GPUs the ``triton`` backend is the reference (SDPA's
flash / memory-efficient kernels), registered so a model run under ``use_backend("triton")`` works.

Second-order gradients: neither backend has them on CPU (torch's CPU flash backward has no
derivative either); wrap the call in ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` under
``use_backend("torch")`` for those.

Contract: fp32 within 1e-5 of this reference; bf16/fp16 within their rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _ext, _triton
from . import _validate as V
from ._registry import register, select
from ._spec import KernelSpec, acc_dtype, empty, needs_grad

OP = "attention"
MAX_T = 512  # the cpp kernel keeps B H T^2 probabilities


@register(OP, "torch")
def attention_reference(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


# ---------------------------------------------------------------- compiled (cpp) backend
def _fake(q, k, v, need_probs):
    return empty(q), q.new_empty((*q.shape[:3], q.shape[2]) if need_probs else (0,), dtype=acc_dtype(q))


def _backward_fake(dout, q, k, v, probs):
    return empty(q), empty(q), empty(q)


# The C++ extension's ops only (autograd in csrc/attention/autograd.cpp); no Triton kernel.
BACKWARD = KernelSpec("attention_backward",
                      "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor probs) -> (Tensor dq, Tensor dk, Tensor dv)",
                      _backward_fake)
FORWARD = KernelSpec("attention", "(Tensor q, Tensor k, Tensor v, bool need_probs) -> (Tensor out, Tensor probs)",
                     _fake, backward=BACKWARD)

# cpp: the avx2 variant beat the reference on an AVX2-only EPYC, a Xeon and a Zen 5 EPYC, and AVX-512
# CPUs run it too (csrc/attention/cpu.cpp; benchmarks/results/cpu-avx512-epyc-NOTES.md). The
# default (baseline x86-64) variant lost to a reference running ATen's AVX2 kernels, but beat it
# (1.19-1.77x) with ATen, oneDNN and MKL held to SSE as on a CPU without AVX2
# (cpu-avx512-epyc-variants.md). On GPUs the "triton" backend is the reference (SDPA's flash
# kernels), ranked as the reference.
RANKS = {"cpp": {"cpu": 1}, "triton": {"cuda": 0}}


def _cpp_accepts(flags) -> bool:
    short, cpu_autocast = flags
    return short and not cpu_autocast


_ext.bind(BACKWARD)
if (_compiled := _ext.bind(FORWARD)) is not None and _ext.has_kernel(FORWARD.name, "cpp"):
    register(OP, "cpp", ranks=RANKS["cpp"], accepts=_cpp_accepts, in_transforms=False)(
        lambda q, k, v: _compiled(q, k, v, needs_grad(q, k, v))[0])

_triton.register_triton(OP, attention_reference, RANKS["triton"])


def validate(q, k, v):
    V.tensor("q", q, 4)
    V.tensor("k", k, 4)
    V.tensor("v", v, 4)
    V.shape("k", k, q.shape, "same as q: (B, H, T, hd)")
    V.shape("v", v, q.shape, "same as q: (B, H, T, hd)")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    V.same_device("q", q, k=k, v=v)


def attention(q, k, v) -> torch.Tensor:
    """``softmax(q @ k.transpose(-1, -2) / sqrt(hd)) @ v``; see the module docstring."""
    if all(isinstance(t, torch.Tensor) for t in (q, k, v)) and 0 in (q.numel(), k.numel(), v.numel()):
        return attention_reference(q, k, v)  # an empty batch (or sequence): SDPA's own answer or error
    validate(q, k, v)
    flags = (q.shape[2] <= MAX_T, q.device.type == "cpu" and torch.is_autocast_enabled("cpu"))
    return select(OP, q, flags).fn(q, k, v)
