"""One description per kernel-level op, registered in every namespace that defines it.

A fused op is built from kernel-level ops (``norm_modulate`` and ``norm_modulate_backward``, say)
that exist in up to two namespaces: ``flowfm::`` (the C++ extension; schema in csrc/schema.cpp,
autograd in C++) and ``flowfm_triton::`` (the Triton kernels, defined in Python from the schema
here). Their fake (meta) kernel and their Python derivative are the same in both, so each is
written once, in a :class:`KernelSpec` beside the op's reference, and bound to each namespace
(:func:`flowfm_fast.ops._ext.bind`, :func:`flowfm_fast.ops._triton.bind`). The C++ autograd
(``csrc/<op>/autograd.cpp``) implements the same derivative for the ``flowfm::`` ops: the Python
autograd path cost as much host time per call as a small layer's kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class KernelSpec:
    """``name`` and ``schema`` (``"(Tensor x, ...) -> (...)"``, the same as in csrc/schema.cpp);
    ``fake(*args)`` returns outputs of the right shapes, dtypes and strides; where the op is
    differentiable, ``setup_context(ctx, inputs, output)`` and ``derivative(backward_op)``, which
    returns ``backward(ctx, *grads)`` built on the namespace's own backward op (the spec named by
    ``backward``)."""
    name: str
    schema: str
    fake: Callable
    setup_context: Callable | None = None
    derivative: Callable[[Callable], Callable] | None = None
    backward: "KernelSpec | None" = None
    mutates_args: tuple[str, ...] = ()


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The kernels' statistics / accumulation dtype: float64 if any input is, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def empty(like: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor of ``like``'s shape, dtype and device: what the kernels return (fake
    kernels must say so; ``empty_like`` would keep a transposed input's strides)."""
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


def empty_or_absent(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The gradient slot of an optional input: contiguous like it, or an empty (0,) tensor."""
    return like.new_empty((0,)) if t is None else empty(t)


def grad_or_none(g: torch.Tensor, needed: bool):
    """A kernel's gradient output, or None where the input was absent or needs no gradient."""
    return g if needed and g.numel() > 0 else None


def needs_grad(*tensors) -> bool:
    """Whether a backward will ask for a gradient of one of these (grad mode on, one requires it)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
