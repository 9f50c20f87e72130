"""NVTX ranges for Nsight: :func:`nvtx_range` (a context manager) and :func:`nvtx_wrap` (a
decorator), switched by ``FLOWFM_NVTX``.

A leaf: it imports only torch and the standard library, so every layer (ops, models, integrate,
train) may import it and it can never close an import circle (``tests/test_imports.py`` checks).

Ranges are on when ``FLOWFM_NVTX=1`` is set and CUDA is available; otherwise :func:`nvtx_range`
hands back one shared ``contextlib.nullcontext``, so a disabled range costs a function call and a
flag test and never raises, CPU-only torch builds included. The model code names its ranges:

- ``encoder`` (the encoder forward), ``dit.block{i}`` / ``resnet.block{i}`` (each velocity-net
  block), ``flowfm.loss`` (the whole loss forward: encoder, interpolation, network, loss);
- ``integrate.prepare`` (the batched conditioning of a solve), ``integrate.step{n}`` (each
  integrator step), ``integrate.graph_capture`` / ``integrate.graph_replay`` (a CUDA-graph solve:
  NVTX calls are host-side, so the per-step ranges are emitted once at capture and a replay shows
  as one ``integrate.graph_replay`` range around all K steps' kernels; ``graph=False`` brings the
  per-step ranges back); ``ddpm.step`` / ``ddim.step`` (the diffusion samplers);
- ``train.backward`` and ``train.optimizer_step`` in the training loops.

Under ``torch.compile`` the ranges are left out of the compiled region (Dynamo traces the
``nullcontext`` without a graph break; an NVTX call would break the graph), also with
``FLOWFM_NVTX=1``. Backward kernels run on autograd's thread, outside the forward's ranges; wrap
the run in ``torch.autograd.profiler.emit_nvtx()`` to see per-op ranges there too.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

__all__ = ["ENV_VAR", "nvtx_enabled", "nvtx_range", "nvtx_wrap", "refresh_nvtx"]

ENV_VAR = "FLOWFM_NVTX"
_NULL = contextlib.nullcontext()   # shared: Dynamo traces a nullcontext, not a custom class
_ENABLED = False


def refresh_nvtx() -> bool:
    """Re-read ``FLOWFM_NVTX`` (done once at import); returns whether ranges are now emitted."""
    global _ENABLED
    want = os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")
    # is_available() only when asked: it probes the driver, and the default path should not.
    _ENABLED = bool(want and torch.cuda.is_available())
    return _ENABLED


def nvtx_enabled() -> bool:
    """Whether ranges are emitted now (``FLOWFM_NVTX`` as last read, and CUDA available)."""
    return _ENABLED


class _Range:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        torch.cuda.nvtx.range_push(self.name)

    def __exit__(self, *exc):
        torch.cuda.nvtx.range_pop()
        return False


def nvtx_range(name: str):
    """``with nvtx_range("name"):`` pushes an NVTX range for the block (when enabled, see the
    module docstring); a shared no-op context otherwise. For functions use :func:`nvtx_wrap`."""
    if _ENABLED and not torch.compiler.is_compiling():
        return _Range(name)
    return _NULL


def nvtx_wrap(name: str):
    """Decorator form of :func:`nvtx_range`; the switch is checked per call, not at decoration."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with nvtx_range(name):
                return fn(*args, **kwargs)
        return wrapped
    return deco


refresh_nvtx()
