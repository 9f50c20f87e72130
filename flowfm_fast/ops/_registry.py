"""The one dispatch registry: every op's implementations, each saying where it runs and how well.

An implementation (:class:`Impl`) declares, as data beside its code:

- ``backend``: ``torch`` (the plain-PyTorch reference, always present), ``triton``, ``cpp`` or ``cuda``;
- ``ranks``: the device types it serves and its rank on each (higher wins; the reference is 0
  everywhere). A key ``"cpu:<capability>"`` overrides ``"cpu"`` for one CPU instruction set, so a
  kernel that loses to the reference on AVX2 can step aside there; a key ``"compile:<device type>"``
  overrides the rank while torch.compile traces, so an op that Inductor fuses better with its
  neighbours than our kernel runs alone decomposes to the reference inside compiled graphs (rank 0:
  the reference wins the tie). A negative rank serves only when the backend is forced. Each op
  file names the measurement its ranks come from;
- ``accepts``: optionally, a predicate over the op's *call flags*, the few input properties that
  change the choice (whether a gradient is needed, a sequence length), which the op's public
  function computes and passes to :func:`select`;
- ``in_transforms``: whether it runs under torch.func transforms (C++ autograd functions do not).

A call picks (1) the backend forced by the innermost :func:`use_backend`, else by
``FLOWFM_BACKEND`` (read once, at import), and raises if that backend cannot serve; (2) else the
highest-ranked implementation that serves. The choice is cached per (op, device type, forced
backend, CPU capability, torch.func transform active, call flags), so a call costs one dictionary
lookup; while torch.compile traces, the choice is resolved from the same data without the cache
(dispatch is a trace-time decision, baked into the graph).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import torch

from .. import _backend

BACKENDS = ("torch", "triton", "cpp", "cuda")
REFERENCE_RANKS: Mapping[str, int] = {"*": 0}  # the reference serves every device type, rank 0
FORCED_ONLY = -1  # a rank that serves only when the backend is forced


@dataclass(frozen=True)
class Impl:
    backend: str
    fn: Callable
    ranks: Mapping[str, int] = field(default_factory=lambda: dict(REFERENCE_RANKS))
    accepts: Callable[[tuple], bool] | None = None
    in_transforms: bool = True

    def rank(self, device_type: str, capability: str, compiling: bool = False) -> int | None:
        """Its rank on this device (and CPU capability; inside a torch.compile trace or not), or
        None where it does not serve."""
        r = self.ranks
        if compiling:
            traced = r.get("compile:" + device_type)
            if traced is not None:
                return traced
        if device_type == "cpu":
            specific = r.get("cpu:" + capability)
            if specific is not None:
                return specific
        value = r.get(device_type)
        return r.get("*") if value is None else value

    def serves(self, device_type: str, capability: str, transform: bool, flags: tuple, compiling: bool = False) -> bool:
        return (self.rank(device_type, capability, compiling) is not None and (self.in_transforms or not transform)
                and (self.accepts is None or self.accepts(flags)))


_IMPLS: dict[str, dict[str, Impl]] = {}
_CACHE: dict[tuple, Impl] = {}
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("flowfm_backend", default=None)


def _check_backend_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where} must be one of {BACKENDS}, got {name!r}")
    return name


def _env_backend() -> str | None:
    env = os.environ.get("FLOWFM_BACKEND", "").strip().lower()
    return env or None


# FLOWFM_BACKEND is read at import (as ATen reads ATEN_CPU_CAPABILITY) and by reload_env(); an
# invalid value is reported on the first call, as a ValueError naming the variable.
_env_forced: str | None = _env_backend()


def reload_env() -> None:
    """Re-read ``FLOWFM_BACKEND`` (read once at import; :func:`use_backend` is the run-time switch)."""
    global _env_forced
    _env_forced = _env_backend()
    _CACHE.clear()


def register(op: str, backend: str, *, ranks: Mapping[str, int] | None = None,
             accepts: Callable[[tuple], bool] | None = None, in_transforms: bool = True):
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op`` (see :class:`Impl`)."""
    _check_backend_name(backend, "backend")
    if backend == "torch" and ranks is None:
        ranks = REFERENCE_RANKS
    if ranks is None:
        raise ValueError(f"{op}/{backend}: a fused backend must declare its ranks (device type -> rank)")

    def deco(fn):
        _IMPLS.setdefault(op, {})[backend] = Impl(backend, fn, dict(ranks), accepts, in_transforms)
        _CACHE.clear()
        return fn

    return deco


def backends_for(op: str) -> tuple[str, ...]:
    """The backends registered for ``op``."""
    return tuple(_IMPLS.get(op, {}))


def impl_for(op: str, backend: str) -> Impl | None:
    """The registered implementation (its ranks and predicates), for tests and reports."""
    return _IMPLS.get(op, {}).get(backend)


@contextlib.contextmanager
def override(op: str, backend: str, fn: Callable) -> Iterator[Impl]:
    """Run ``fn`` in place of ``backend``'s implementation of ``op`` inside the block, same ranks
    (benchmarks swap the reference for ``torch.compile`` of it this way)."""
    impls = _IMPLS[op]
    original = impls[backend]
    impls[backend] = dataclasses.replace(original, fn=fn)
    _CACHE.clear()
    try:
        yield impls[backend]
    finally:
        impls[backend] = original
        _CACHE.clear()


def fused_backends(op: str, device_type: str) -> tuple[str, ...]:
    """The fused backends of ``op`` that serve ``device_type`` automatically (rank > 0), best first."""
    capability = _backend.cpu_capability()
    ranked = [(impl.rank(device_type, capability), name) for name, impl in _IMPLS.get(op, {}).items()
              if name != "torch"]
    return tuple(name for r, name in sorted(ranked, reverse=True, key=lambda p: (p[0] or 0)) if r is not None and r > 0)


# Dynamo cannot trace ContextVar.get: under torch.compile the choice is read once, when the graph is
# traced, and baked into it. Changing the forced backend later needs a fresh compile.
def forced_backend() -> str | None:
    """The backend forced by the innermost :func:`use_backend`, else ``FLOWFM_BACKEND``, else None."""
    name = _forced.get()
    if name is not None:
        return name
    return None if _env_forced is None else _check_backend_name(_env_forced, "FLOWFM_BACKEND")


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


def _transform_active() -> bool:
    """Inside torch.func.grad / vmap / vjp ...: C++ autograd functions refuse to run there.
    (Not asked while torch.compile traces: Dynamo reports an interpreter of its own there.)"""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _resolve(op: str, device_type: str, forced: str | None, capability: str, transform: bool,
             flags: tuple, compiling: bool = False) -> Impl:
    impls = _IMPLS[op]
    if forced is not None:
        impl = impls.get(forced)
        if impl is None:
            raise RuntimeError(f"backend {forced!r} is forced but has no implementation of {op} "
                               f"(available: {', '.join(impls)})")
        if not impl.serves(device_type, capability, transform, flags, compiling):
            where = "under a torch.func transform" if transform and not impl.in_transforms else "on these inputs"
            raise RuntimeError(f"backend {forced!r} is forced but cannot run {op} {where} "
                               f"(device {device_type})")
        return impl
    best, best_rank = impls["torch"], 0
    for impl in impls.values():
        r = impl.rank(device_type, capability, compiling)
        if r is not None and r > best_rank and impl.serves(device_type, capability, transform, flags, compiling):
            best, best_rank = impl, r
    return best


def _device_type(where) -> str:
    # Tensor.is_cuda / is_cpu are plain attribute reads; .device.type builds a device object (~1 us).
    if isinstance(where, torch.Tensor):
        return "cuda" if where.is_cuda else ("cpu" if where.is_cpu else where.device.type)
    return where.type


def select(op: str, where, flags: tuple = ()) -> Impl:
    """The implementation of ``op`` that runs for inputs on ``where`` (a tensor or a device) with
    these call flags."""
    if torch.compiler.is_compiling():  # forced_backend is a trace-time constant (see above)
        return _resolve(op, _device_type(where), forced_backend(), _backend.cpu_capability(), False, flags, True)
    forced = _forced.get() or _env_forced
    key = (op, _device_type(where), forced, _backend.cpu_capability(), _transform_active(), flags)
    impl = _CACHE.get(key)
    if impl is None:
        if forced is not None:
            forced_backend()  # a bad FLOWFM_BACKEND is a ValueError naming it
        impl = _CACHE[key] = _resolve(*key)
    return impl


def describe() -> str:
    """One line per op: its backends and their ranks."""
    def ranks(impl: Impl) -> str:
        return ", ".join(f"{k}={v}" for k, v in impl.ranks.items())
    return "\n".join(f"{op}: " + "; ".join(f"{b} ({ranks(i)})" for b, i in impls.items())
                     for op, impls in sorted(_IMPLS.items()))
