"""The compiled ops of ``flowfm_fast._C`` (``torch.ops.flowfm.*``) as registry backends.

The extension defines each op's schema, its CPU (``cpp`` backend) and CUDA C++ (``cuda`` backend)
kernels and its autograd (C++, ``csrc/<family>_autograd.cpp``); the op files here add fake (meta)
kernels with :func:`torch.library.register_fake`, so the ops are opaque to torch.compile and
differentiable. C++ autograd functions do not run under torch.func transforms (grad, vmap, vjp):
there the compiled backends step aside and the dispatch picks the next one (the reference).
A stale or missing extension registers nothing.
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import _backend
from ._registry import register

_DEVICE_KEY = {"cpp": ("cpu", "CPU"), "cuda": ("cuda", "CUDA")}
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def available() -> bool:
    return _backend.extension is not None


def has_kernel(name: str, backend: str) -> bool:
    """Whether ``flowfm::name`` has a kernel for ``backend``'s device in the loaded extension."""
    if not available():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"flowfm::{name}", _DEVICE_KEY[backend][1])
    except RuntimeError:  # op not defined (older schema file)
        return False


def op(name: str):
    return getattr(torch.ops.flowfm, name)


def in_functorch_transform() -> bool:
    """Inside torch.func.grad / vmap / vjp / jacrev ...: C++ autograd functions refuse to run there.
    (Not asked while torch.compile traces: Dynamo reports an interpreter of its own there.)"""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def _predicate(device_type: str) -> Callable[..., bool]:
    def can_use(*tensors) -> bool:
        return not in_functorch_transform() and all(
            t is None or not isinstance(t, torch.Tensor)
            or (t.device.type == device_type and t.dtype in SUPPORTED_DTYPES) for t in tensors)
    return can_use


def register_compiled(op_name: str, kernel: str, fn: Callable) -> None:
    """Register ``fn`` (which calls ``torch.ops.flowfm.<kernel>``) as the ``cpp`` and/or ``cuda``
    backend of registry op ``op_name``, for each device the extension has a kernel for."""
    for backend, (device_type, _) in _DEVICE_KEY.items():
        if has_kernel(kernel, backend):
            register(op_name, backend, _predicate(device_type))(fn)


def grad_or_none(g: torch.Tensor, needed: bool):
    """A kernel's gradient output, or None where the input was absent or needs no gradient."""
    return g if needed and g.numel() > 0 else None


def empty(like: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor of ``like``'s shape, dtype and device: what the kernels return (fake
    kernels must say so; ``empty_like`` would keep a transposed input's strides)."""
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)
