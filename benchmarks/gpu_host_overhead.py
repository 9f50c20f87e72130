"""GPU only: host time per call of the fused ops at the ``small`` DiT's shapes (B=64, T=30,
D=256), where the GPU work is a few microseconds and the host is the limit: each op's forward +
backward timed with the host clock over many calls without a sync, then once more with a sync
(the GPU's share), for the reference (eager), the cuda backend, and the triton backend through its
eager path and through the dispatcher (the registered op, as torch.compile sees it).

    python benchmarks/gpu_host_overhead.py
"""
from __future__ import annotations

import os
import time

import torch

from flowfm_fast import ops
from flowfm_fast.ops import _triton, use_backend

dev = torch.device(os.environ.get("DEVICE", "cuda"))  # DEVICE=cpu with TRITON_INTERPRET=1: a dry run
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
B, T, D = 64, 30, 256


def leaf(*shape):
    return torch.randn(*shape, device=dev).requires_grad_(True)


x, h, gy = leaf(B, T, D), leaf(B, T, D), torch.randn(B, T, D, device=dev)
shift, scale, gate = leaf(B, D), leaf(B, D), leaf(B, D)
xg, shg, scg = leaf(B, 128, 60), leaf(B, 128), leaf(B, 128)
w, b = leaf(128), leaf(128)
x0, x1, v = torch.randn(B, 3, 60, device=dev), torch.randn(B, 3, 60, device=dev), leaf(B, 3, 60)
t = torch.rand(B, device=dev)


def grad(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


CASES = {
    "norm_modulate layer": lambda: grad(ops.norm_modulate(x, shift, scale, "layer", eps=1e-6), (x, shift, scale), gy),
    "norm_modulate group+silu": lambda: grad(ops.norm_modulate(xg, shg, scg, "group", w, b, 1e-5, "silu", 32),
                                             (xg, shg, scg, w, b), torch.ones_like(xg)),
    "gated_residual_norm_modulate": lambda: grad(ops.gated_residual_norm_modulate(x, h, gate, shift, scale, "layer",
                                                                                  eps=1e-6), (x, h, gate, shift, scale),
                                                 (gy, gy)),
    "fm_loss": lambda: grad(ops.fm_loss(v, x0, x1, t), (v,), None),
    "timestep_embedding fwd": lambda: ops.timestep_embedding(t, 256),
}


def host_us(fn, n=200):
    for _ in range(10):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    sync()
    t2 = time.perf_counter()
    return 1e6 * (t1 - t0) / n, 1e6 * (t2 - t0) / n


print(f"{'case':32s} {'path':22s} {'host us/call':>13s} {'with sync':>10s}")
for name, fn in CASES.items():
    op = name.split()[0]
    for label, backend, eager in (("reference", "torch", True), ("cuda", "cuda", True),
                                  ("triton eager path", "triton", True), ("triton dispatcher", "triton", False)):
        if backend not in ops.backends_for(op):
            continue
        saved = _triton._eager_ok
        if not eager:
            _triton._eager_ok = lambda args: False
        try:
            with use_backend(backend):
                host, total = host_us(fn)
            print(f"{name:32s} {label:22s} {host:13.0f} {total:10.0f}", flush=True)
        except Exception as exc:  # say so and go on: the other rows still measure
            print(f"{name:32s} {label:22s} failed: {str(exc)[:120]}", flush=True)
        finally:
            _triton._eager_ok = saved
