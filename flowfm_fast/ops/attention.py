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
from .fm_loss import _need_grad

OP = "attention"
MAX_T = 512  # the cpp kernel keeps B H T^2 probabilities


@register(OP, "torch")
def attention_reference(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


# ---------------------------------------------------------------- compiled (cpp) backend
if _ext.has_kernel("attention", "cpp"):
    @torch.library.register_fake("flowfm::attention")
    def _attn_fake(q, k, v, need_probs):
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        return _ext.empty(q), q.new_empty((*q.shape[:3], q.shape[2]) if need_probs else (0,), dtype=acc)

    @torch.library.register_fake("flowfm::attention_backward")
    def _attn_backward_fake(dout, q, k, v, probs):
        return _ext.empty(q), _ext.empty(q), _ext.empty(q)

    # Autograd: in C++ (csrc/attention_autograd.cpp), as for every compiled op.
    _on_cpu = _ext._predicate("cpu")

    def _cpp_can_use(q, *kv):
        return (_on_cpu(q, *kv) and (q.dim() < 3 or q.shape[2] <= MAX_T)
                and not torch.is_autocast_enabled("cpu"))

    register(OP, "cpp", _cpp_can_use)(lambda q, k, v: _ext.op("attention")(q, k, v, _need_grad(q, k, v))[0])

_triton.register_triton(OP, attention_reference)


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
    return select(OP, q.device, q, k, v).fn(q, k, v)
