"""The compiled ops of ``flowfm_fast._C`` (``torch.ops.flowfm.*``) as registry backends.

The extension defines each op's schema (csrc/schema.cpp), its CPU (``cpp`` backend) and CUDA C++
(``cuda`` backend) kernels and its autograd (C++, ``csrc/<op>/autograd.cpp``); the op files here
register each kernel's fake (meta) kernel from its :class:`~flowfm_fast.ops._spec.KernelSpec`, so
the ops are opaque to torch.compile and differentiable. C++ autograd functions do not run under
torch.func transforms (grad, vmap, vjp): there the compiled backends step aside and the reference
runs. A stale or missing extension registers nothing.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from .. import _backend
from ._registry import register
from ._spec import KernelSpec

_DEVICE_KEY = {"cpp": "CPU", "cuda": "CUDA"}


def available() -> bool:
    return _backend.extension is not None


def has_kernel(name: str, backend: str) -> bool:
    """Whether ``flowfm::name`` has a kernel for ``backend``'s device in the loaded extension."""
    if not available():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"flowfm::{name}", _DEVICE_KEY[backend])
    except RuntimeError:  # op not defined (older schema file)
        return False


def defines(name: str) -> bool:
    """Whether the loaded extension has a kernel of ``flowfm::name`` for any device."""
    return has_kernel(name, "cpp") or has_kernel(name, "cuda")


def op(name: str):
    return getattr(torch.ops.flowfm, name)


# The specs bound to flowfm:: ops, by name (tests check each schema against csrc/schema.cpp's).
BOUND: dict[str, KernelSpec] = {}


def bind(spec: KernelSpec):
    """Register ``spec``'s fake kernel for ``flowfm::<name>``; returns the op, or None where the
    extension does not define it."""
    if not defines(spec.name):
        return None
    torch.library.register_fake(f"flowfm::{spec.name}", spec.fake)
    BOUND[spec.name] = spec
    return op(spec.name)


def register_compiled(op_name: str, kernel: str, fn: Callable, ranks: Mapping[str, Mapping[str, int]],
                      accepts: Callable[[tuple], bool] | None = None) -> None:
    """Register ``fn`` (which calls ``torch.ops.flowfm.<kernel>``) as the ``cpp`` and/or ``cuda``
    backend of registry op ``op_name``, for each device the extension has a kernel for, with the
    ranks the op declares for that backend."""
    for backend in _DEVICE_KEY:
        if has_kernel(kernel, backend):
            register(op_name, backend, ranks=ranks[backend], accepts=accepts, in_transforms=False)(fn)
