"""The one dispatch registry: every op's backends, and how a call picks one.

Each op family registers one implementation per backend (``torch`` is the plain-PyTorch
reference and always present; ``triton``, ``cpp`` and ``cuda`` come from the kernel issues),
each with a ``can_use(*tensors)`` predicate. A call picks, in order:

1. a backend forced by :func:`use_backend` (innermost wins) or by ``FLOWFM_BACKEND``;
   a forced backend that is missing or cannot take the inputs raises, never falls back silently;
2. else the first backend of the device's preference list whose predicate accepts the inputs.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

BACKENDS = ("torch", "triton", "cpp", "cuda")
# CUDA: Triton first (the CUDA extension registers itself ahead of it per op where it measured faster).
DEVICE_PREFERENCE = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpp", "torch"),
}


@dataclass(frozen=True)
class Impl:
    fn: Callable
    can_use: Callable[..., bool]


_IMPLS: dict[str, dict[str, Impl]] = {}
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("flowfm_backend", default=None)


def _always(*_args) -> bool:
    return True


def register(op: str, backend: str, can_use: Callable[..., bool] | None = None):
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def deco(fn):
        _IMPLS.setdefault(op, {})[backend] = Impl(fn, can_use or _always)
        return fn

    return deco


def backends_for(op: str) -> tuple[str, ...]:
    """The backends registered for ``op``."""
    return tuple(_IMPLS.get(op, {}))


def _check_backend_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where} must be one of {BACKENDS}, got {name!r}")
    return name


# Dynamo cannot trace ContextVar.get: under torch.compile the choice is read once, when the graph is
# traced, and baked into it (dispatch is a trace-time decision; the compiled graph holds the
# custom op of the chosen backend). Changing the forced backend later needs a fresh compile.
def forced_backend() -> str | None:
    """The backend forced by the innermost :func:`use_backend`, else ``FLOWFM_BACKEND``, else None."""
    name = _forced.get()
    if name is not None:
        return name
    env = os.environ.get("FLOWFM_BACKEND", "").strip().lower()
    return _check_backend_name(env, "FLOWFM_BACKEND") if env else None


# What torch.compiler.assume_constant_result sets; set directly because calling it imports
# torch._dynamo (and triton), seconds at `import flowfm_fast` that eager users never need. The
# compile tests (tests/ops/test_cpp_backend.py, fullgraph=True) fail if dynamo stops honouring it.
forced_backend._dynamo_marked_constant = True


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force every op inside the block onto ``name`` (``None`` defers to ``FLOWFM_BACKEND``, else
    automatic choice).

    >>> with use_backend("torch"):
    ...     y = flowfm_fast.ops.gated_residual(res, h, gate)
    """
    if name is not None:
        _check_backend_name(name, "backend")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def select(op: str, device: torch.device, *tensors) -> Impl:
    """The implementation of ``op`` that runs for inputs on ``device``."""
    impls = _IMPLS[op]
    name = forced_backend()
    if name is not None:
        impl = impls.get(name)
        if impl is None:
            raise RuntimeError(
                f"backend {name!r} is forced but has no implementation of {op} "
                f"(available: {', '.join(impls)})"
            )
        if not impl.can_use(*tensors):
            raise RuntimeError(f"backend {name!r} is forced but cannot run {op} on these inputs")
        return impl
    for candidate in DEVICE_PREFERENCE.get(device.type, ("torch",)):
        impl = impls.get(candidate)
        if impl is not None and impl.can_use(*tensors):
            return impl
    return impls["torch"]


def describe() -> str:
    """One line per op: which backends are registered."""
    return "\n".join(f"{op}: {', '.join(impls)}" for op, impls in sorted(_IMPLS.items()))
