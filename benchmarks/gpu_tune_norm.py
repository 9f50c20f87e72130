"""GPU only: sweep the Triton norm_modulate forward launch settings (GPU_ROW_TILE / GPU_GROUP_TILE
elements per program, values per thread -> warps)
at large rows, timing the public op with triton.testing.do_bench (CUDA events, median), next to
the cuda backend, eager and torch.compile of the reference in the same process.

    python benchmarks/gpu_tune_norm.py            # prints a table; GB/s against a 1 GiB copy
"""
from __future__ import annotations

import itertools
import sys

import torch
import triton
from triton.testing import do_bench

from flowfm_fast import ops
from flowfm_fast.ops import _registry, use_backend
from flowfm_fast.kernels import norm_modulate as K

dev = torch.device("cuda")
src = torch.randn(256 * 2 ** 20, device=dev)
dst = torch.empty_like(src)
copy_gbps = 2 * src.numel() * 4 / (do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median") * 1e-3) / 1e9
del src, dst
print(f"copy {copy_gbps:.0f} GB/s")


def cases():
    g = torch.Generator(dev).manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(64, 1024, 1024, device=dev, generator=g).to(dtype)
        sh, sc = (0.1 * torch.randn(64, 1024, device=dev, generator=g)).to(dtype), (0.1 * torch.randn(64, 1024, device=dev, generator=g)).to(dtype)
        yield f"layer {dtype} 64x1024x1024", (lambda x=x, sh=sh, sc=sc: ops.norm_modulate(x, sh, sc, "layer", eps=1e-6)), 2 * x.numel() * x.element_size(), (x, sh, sc)
    x = torch.randn(256, 128, 2048, device=dev, generator=g)
    w, b = torch.ones(128, device=dev), torch.zeros(128, device=dev)
    sh = sc = 0.1 * torch.randn(256, 128, device=dev, generator=g)
    yield "group32+silu 256x128x2048", (lambda: ops.norm_modulate(x, sh, sc, "group", w, b, 1e-5, "silu", 32)), 2 * x.numel() * 4, (x, sh, sc)


def t_ms(fn):
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


rows = []
orig = K.GPU_ROW_TILE, K.GPU_GROUP_TILE, K.fwd_warps
for name, fn, nbytes, _ in cases():
    ref = _registry._IMPLS["norm_modulate"]["torch"]
    with use_backend("torch"):
        rows.append((name, "eager", t_ms(fn)))
        _registry._IMPLS["norm_modulate"]["torch"] = _registry.Impl(torch.compile(ref.fn, dynamic=False), ref.can_use)
        try:
            rows.append((name, "compile", t_ms(fn)))
        finally:
            _registry._IMPLS["norm_modulate"]["torch"] = ref
    if "cuda" in ops.backends_for("norm_modulate"):
        with use_backend("cuda"):
            rows.append((name, "cuda", t_ms(fn)))
    for tile, per_thread in itertools.product((1024, 2048, 4096, 8192, 16384), (4, 8, 16, 32)):
        K.GPU_ROW_TILE = K.GPU_GROUP_TILE = tile
        K.fwd_warps = lambda e, _=None, p=per_thread: max(1, min(16, triton.next_power_of_2(max(1, e // (32 * p)))))
        try:
            with use_backend("triton"):
                rows.append((name, f"triton tile={tile} vals/thread={per_thread}", t_ms(fn)))
        except Exception as exc:  # a config the compiler refuses: say so, go on
            print(name, tile, per_thread, "failed:", str(exc)[:200], file=sys.stderr)
    K.GPU_ROW_TILE, K.GPU_GROUP_TILE, K.fwd_warps = orig
    best = min((r for r in rows if r[0] == name), key=lambda r: r[2])
    for r in rows:
        if r[0] == name:
            print(f"{r[0]:28s} {r[1]:36s} {r[2]*1e3:8.1f} us {nbytes / (r[2] * 1e-3) / 1e9:7.0f} GB/s "
                  f"{100 * nbytes / (r[2] * 1e-3) / 1e9 / copy_gbps:4.0f}%{'  <- best' if r is best else ''}")
