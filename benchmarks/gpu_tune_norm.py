"""GPU only: sweep the Triton norm_modulate forward launch settings (GPU_ROW_TILE / GPU_GROUP_TILE
elements per program, values per thread -> warps)
at large rows, timing the public op with triton.testing.do_bench (CUDA events, median), next to
the cuda backend, eager and torch.compile of the reference in the same process.

    python benchmarks/gpu_tune_norm.py [fwd|bwd|both]   # a table per case; GB/s against a 1 GiB copy
    TIMER=events python benchmarks/gpu_tune_norm.py     # host overhead included (see t_ms)

fwd sweeps GPU_ROW_TILE / GPU_GROUP_TILE and the forward warps (warps_for); bwd times
forward + backward while sweeping the backward's GPU_BWD_TILE, warps (num_warps) and GPU_PROGRAMS,
the forward at its default. Each setting is a module attribute of the norm kernels
(kernels/_blocks.py, norm_tokens.py, norm_group.py), set in every one of them that has it. Bytes: fwd reads x and writes y; fwd+bwd also reads dy and x and
writes dx (the modulation tensors are small).
"""
from __future__ import annotations

import itertools
import os
import sys

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from flowfm_fast import ops
from flowfm_fast.ops import _registry, use_backend
from flowfm_fast.kernels import _blocks, norm_group, norm_tokens
from gpu_cases import norm_cases

dev = torch.device("cuda")
src = torch.randn(256 * 2 ** 20, device=dev)
dst = torch.empty_like(src)
copy_gbps = 2 * src.numel() * 4 / (do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median") * 1e-3) / 1e9
del src, dst
print(f"copy {copy_gbps:.0f} GB/s")


TIMER = os.environ.get("TIMER", "cudagraph")


def t_ms(fn):
    """Median GPU time of one call. ``cudagraph`` (default): the calls replayed from a CUDA graph, so
    the host's share (launch and Python overhead, measured by gpu_host_overhead.py) is left out and
    a launch setting's own effect shows; ``events``: back-to-back calls timed by CUDA events."""
    if TIMER == "cudagraph":
        return do_bench_cudagraph(fn, rep=50, return_mode="median")
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def timed(op, inputs, mode):
    """A callable running ``op`` once in ``mode`` and the bytes that must move."""
    x = inputs[0]
    n = x.numel() * x.element_size()
    if mode == "fwd":
        return (lambda: op(*inputs)), 2 * n
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    gy = torch.randn_like(x)
    return (lambda: torch.autograd.grad(op(*leaves), leaves, gy)), 5 * n


# The norm kernel modules whose attributes a sweep sets. A helper (warps_for, num_warps) is
# defined in _blocks and bound by name in the kernel modules that call it, so it is set in each;
# gated_residual keeps its own bindings (the sweeps time norm_modulate only).
KNOBS = (_blocks, norm_tokens, norm_group)


def warps_per_thread(p):
    return lambda e, _=None: max(1, min(16, triton.next_power_of_2(max(1, e // (32 * p)))))


def sweeps(mode):
    """(label, settings) pairs: attributes of the norm kernel modules (KNOBS) to set for one run."""
    if mode == "fwd":
        for tile, p in itertools.product((1024, 2048, 4096, 8192, 16384), (4, 8, 16, 32)):
            yield f"tile={tile} vals/thread={p}", dict(GPU_ROW_TILE=tile, GPU_GROUP_TILE=tile, warps_for=warps_per_thread(p))
    else:
        for tile, p, progs in itertools.product((2048, 4096), (8, 16, 32), (2, 4, 8, 16)):
            yield (f"bwd tile={tile} vals/thread={p} programs={progs}x132",
                   dict(GPU_BWD_TILE=tile, num_warps=warps_per_thread(p), GROUP_BWD_PER_THREAD=p, GPU_PROGRAMS=progs * 132))


modes = {"fwd": ["fwd"], "bwd": ["fwd+bwd"], "both": ["fwd", "fwd+bwd"]}[sys.argv[1] if len(sys.argv) > 1 else "both"]
def report(mode, name, label, ms, nbytes, mark=""):
    gbps = nbytes / (ms * 1e-3) / 1e9
    print(f"{mode:7s} {name:28s} {label:48s} {ms*1e3:8.1f} us {gbps:7.0f} GB/s {100 * gbps / copy_gbps:4.0f}%{mark}",
          flush=True)  # row by row: a sweep cut off by its deadline still reports what it measured


for mode in modes:
    for name, op, inputs in norm_cases(dev):
        rows = []
        fn, nbytes = timed(op, inputs, mode)

        def measure(label, fn=fn):
            rows.append((label, t_ms(fn)))
            report(mode, name, *rows[-1], nbytes)

        ref = _registry.impl_for("norm_modulate", "torch")
        with use_backend("torch"):
            measure("eager")
            with _registry.override("norm_modulate", "torch", torch.compile(ref.fn, dynamic=False)):
                measure("compile")
        if "cuda" in ops.backends_for("norm_modulate"):
            with use_backend("cuda"):
                measure("cuda")
        with use_backend("triton"):
            measure("triton (defaults)")
            for label, settings in sweeps("fwd" if mode == "fwd" else "bwd"):
                saved = [(m, k, getattr(m, k)) for k in settings for m in KNOBS if hasattr(m, k)]
                assert {k for _, k, _ in saved} == set(settings), settings
                try:
                    for m, k, _ in saved:
                        setattr(m, k, settings[k])
                    measure(f"triton {label}")
                except Exception as exc:  # a config the compiler refuses: say so, go on
                    print(name, label, "failed:", str(exc)[:200], file=sys.stderr)
                finally:
                    for m, k, v in saved:
                        setattr(m, k, v)
        report(mode, name, *min(rows, key=lambda r: r[1]), nbytes, "  <- best")
