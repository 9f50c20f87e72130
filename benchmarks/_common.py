"""What every op suite shares: which implementations to time, how to time one case, its bytes.

Implementations, all timed in the same run through the public op (same validation and dispatch):

- ``eager``: the ``torch`` reference, forced with ``use_backend("torch")``;
- ``compile``: the same call, but the registry's ``torch`` entry is swapped for
  ``torch.compile(reference)`` for the duration of the case: validation and dispatch stay the
  same eager Python as in the other rows, and the reference compiles into one graph whatever the
  dispatch's traceability (before ``forced_backend`` was made ``assume_constant_result`` and the
  fm ops skipped their ``t`` value check while tracing, compiling the public op broke the graph
  at every call). Dynamo is reset per case and compiles with ``dynamic=False``, so every shape
  gets its own static graph and no case hits the recompile limit; compilation happens in the
  warm-up, and ``extra_info`` records the graphs and breaks it produced;
- every fused backend registered for the op (``cpp``, ``triton``, ``cuda``) that the device can
  use, each forced with ``use_backend``; found at collection time, so new kernels join by
  registering themselves.

Modes: ``fwd`` (inputs without grad), and ``fwd+bwd``: forward, then ``torch.autograd.grad`` of
every output against a precomputed random grad_output, w.r.t. the inputs the model trains
(no ``.grad`` accumulation, which would add a read and a write per input).

``bytes`` in ``extra_info`` is what must move: inputs read once and outputs written once (fwd),
plus, for fwd+bwd, the backward's unavoidable reads and writes (stated per op in its suite).
report.py turns it into GB/s and % of the copy bandwidth measured in the same run. By default the
timed loop runs with hot caches: working sets under the last-level cache (32 MiB L3 on the 2-core
CPU) then move at cache speed and can beat the DRAM copy; ``--cold-cache`` evicts the cache
before every timed call (pedantic rounds) for a like-for-like comparison with the copy.
"""
from __future__ import annotations

import contextlib
import random
import statistics
import time
from typing import Callable, ContextManager, Iterator, Mapping, Sequence

import pytest
import torch
from torch._dynamo.utils import counters

import conftest
from conftest import sync
from flowfm_fast.ops import _registry, backends_for, use_backend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MODES = ("fwd", "fwd+bwd")
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def fused_backends(op: str, device: torch.device = DEVICE) -> list[str]:
    """The fused backends registered for ``op`` that ``device``'s dispatch would consider."""
    return list(_registry.fused_backends(op, device.type))


def impls(*op_names: str) -> list[str]:
    """``eager``, ``compile`` and every fused backend any of ``op_names`` has on this device."""
    fused = []
    for op in op_names:
        fused += [b for b in fused_backends(op) if b not in fused]
    return ["eager", "compile", *fused]


def nbytes(*tensors) -> int:
    """Bytes of the given tensors (None skipped; lists flattened)."""
    total = 0
    for t in tensors:
        if isinstance(t, (list, tuple)):
            total += nbytes(*t)
        elif t is not None:
            total += t.numel() * t.element_size()
    return total


def shape_str(**dims) -> str:
    return ",".join(f"{k}={v}" for k, v in dims.items())


@contextlib.contextmanager
def compiled_reference(op: str) -> Iterator[Callable]:
    """Swap the registry's ``torch`` implementation of ``op`` for ``torch.compile`` of it."""
    compiled = torch.compile(_registry.impl_for(op, "torch").fn, dynamic=False)
    with _registry.override(op, "torch", compiled):
        yield compiled


def _clone(v):
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, list):
        return [_clone(t) for t in v]
    return v


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def graph_stats() -> tuple[int, int]:
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def run_op(benchmark, device: torch.device, *, op: str, impl: str, mode: str, case: str, shape: str,
           fn: Callable, inputs: dict, diff: Sequence[str] = (), fwd_bytes: int, bwd_bytes: int = 0,
           flops: int = 0, bwd_flops: int = 0, warmup: int = 3) -> None:
    """Time ``fn(**inputs)`` (a call of public op ``op``) as ``impl`` in ``mode``.

    ``diff``: names of the inputs the model trains (their gradients are computed in fwd+bwd).
    ``flops`` (with ``fwd_bytes=0``): a compute-bound op (a GEMM), reported in GFLOP/s, not GB/s.
    """
    if mode not in MODES:
        raise ValueError(mode)
    if mode == "fwd+bwd" and not diff:
        raise ValueError(f"{case}: fwd+bwd needs the inputs to differentiate")
    backend = "torch" if impl in ("eager", "compile") else impl
    x0 = next(v for v in inputs.values() if isinstance(v, torch.Tensor))
    dtype = DTYPE_NAMES.get(x0.dtype, str(x0.dtype))

    # The fused backend must take these inputs (the registry raises rather than falling back).
    if backend != "torch":
        with use_backend(backend):
            try:
                fn(**_clone(inputs))
            except RuntimeError as exc:
                if "is forced but" in str(exc):
                    pytest.skip(str(exc))
                raise

    ref = None
    if mode == "fwd":  # eager oracle for a sanity check of the timed implementation, on copies
        with use_backend("torch"):
            ref = _as_tuple(fn(**_clone(inputs)))

    with contextlib.ExitStack() as stack:
        stack.enter_context(use_backend(backend))
        if impl == "compile":
            torch._dynamo.reset()
            stack.enter_context(compiled_reference(op))
        graphs0, breaks0 = graph_stats()

        max_err = None
        if mode == "fwd":
            got = _as_tuple(fn(**_clone(inputs)))
            max_err = max(float((g.float() - r.float()).abs().max()) for g, r in zip(got, ref))
            step_inputs = inputs
        else:
            step_inputs = {k: (v.detach().clone().requires_grad_(True) if k in diff else v) for k, v in inputs.items()}
            wrt = [step_inputs[k] for k in diff]
            outs = _as_tuple(fn(**step_inputs))
            grad_outs = [torch.ones_like(o) if o.dim() == 0 else torch.randn_like(o) for o in outs]
            del outs

        if mode == "fwd":
            def step():
                fn(**step_inputs)
                sync(device)
        else:
            def step():
                outs = _as_tuple(fn(**step_inputs))
                torch.autograd.grad(outs, wrt, grad_outs)
                sync(device)

        for _ in range(warmup):  # compile (both graphs in fwd+bwd) and warm caches, outside the timing
            step()
        graphs1, breaks1 = graph_stats()

        benchmark.group = f"{case} {mode} {shape} {dtype}"
        info = dict(impl=impl, op=op, case=case, mode=mode, shape=shape, dtype=dtype, device=device.type)
        if flops:
            info["flops"] = flops + (bwd_flops if mode == "fwd+bwd" else 0)
        else:
            info["bytes"] = fwd_bytes + (bwd_bytes if mode == "fwd+bwd" else 0)
        if max_err is not None:
            info["max_abs_err"] = max_err
        if impl == "compile":
            info.update(compile_graphs=graphs1 - graphs0, compile_breaks=breaks1 - breaks0)
        if conftest.cold_cache():
            info["cold_cache"] = True
            benchmark.extra_info.update(info)
            benchmark.pedantic(step, setup=conftest.cache_flusher(device), rounds=conftest.cold_rounds(), iterations=1)
        else:
            benchmark.extra_info.update(info)
            benchmark(step)



def quantiles(times: Sequence[float]) -> dict:
    """Median, quartiles and count of a list of seconds (what report.py prints)."""
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else (times[0],) * 3
    return dict(median=median, q1=q1, q3=q3, min=min(times), rounds=len(times))


def time_interleaved(benchmark, *, group: str, variants: Mapping[str, tuple[Callable[[], ContextManager], Callable]],
                     rounds: int, info: dict, seed: int = 0) -> dict[str, dict]:
    """Time several implementations of one case *interleaved*: every round runs each variant once,
    in a fresh random order, so a slow drift of the machine (another tenant, the clock) reaches
    every variant alike instead of whichever pytest happened to run during it.

    ``variants``: impl -> (a factory of the context it runs in, its callable, which synchronises).
    Warm-up (compiles) is the caller's. pytest-benchmark times the whole round (its own stats,
    one round = one call of each variant); each variant's own times go to
    ``extra_info["interleaved"][impl]`` (median, quartiles, min, rounds), which report.py prints as
    one row per implementation. Returns those per-variant stats.
    """
    order = list(variants)
    rng = random.Random(seed)
    times: dict[str, list[float]] = {impl: [] for impl in order}

    def one_round():
        rng.shuffle(order)
        for impl in order:
            make_context, fn = variants[impl]
            with make_context():
                t0 = time.perf_counter()
                fn()
                times[impl].append(time.perf_counter() - t0)

    benchmark.group = group
    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=1)
    stats = {impl: quantiles(ts[1:]) for impl, ts in times.items()}  # [0]: the warm-up round
    benchmark.extra_info.update(info, impl="interleaved", interleaved=stats)
    return stats
