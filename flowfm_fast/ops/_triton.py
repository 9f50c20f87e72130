"""The Triton kernels of ``flowfm_fast.kernels`` as registry backends.

Each op family wraps its Triton launches in a :func:`torch.library.custom_op` under the
``flowfm_triton`` namespace, with a fake (meta) kernel and a registered autograd formula, so
torch.compile(fullgraph=True) sees one opaque op. (``torch.library.triton_op`` would let Inductor
look inside, but its fake-tensor trace runs the kernel, which fails under ``TRITON_INTERPRET=1``,
the way CI runs these kernels on the CPU; opaque custom ops work in both places.)

Where the kernels run: CUDA tensors always; CPU tensors only under ``TRITON_INTERPRET=1`` (set
before triton is first imported), which is how the tests exercise them without a GPU. There the
backend is only used when forced; on CPU the automatic choice stays the C++ extension.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Callable

import torch

from ._registry import register

NAMESPACE = "flowfm_triton"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Triton is importable (its kernels may still have no device to run on)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _device_ok(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" or (t.device.type == "cpu" and interpreting())


def can_use(*tensors) -> bool:
    """Every tensor argument lives where the kernels run and has a supported float dtype."""
    return all(t is None or not isinstance(t, torch.Tensor) or (_device_ok(t) and t.dtype in SUPPORTED_DTYPES)
               for t in tensors)


def register_triton(op_name: str, fn: Callable, predicate: Callable[..., bool] = can_use) -> None:
    """Register ``fn`` (which calls a ``flowfm_triton`` custom op) as the ``triton`` backend of ``op_name``."""
    if available():
        register(op_name, "triton", predicate)(fn)
