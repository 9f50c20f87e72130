"""GPU only: where the time of one norm_modulate forward + backward goes, per kernel (torch.profiler,
CUDA activity), for the triton backend and torch.compile of the reference, at the tuning shapes.

    python benchmarks/gpu_profile_norm.py
"""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from flowfm_fast import ops
from flowfm_fast.ops import _registry, use_backend

dev = torch.device("cuda")
g = torch.Generator(dev).manual_seed(0)


def cases():
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(64, 1024, 1024, device=dev, generator=g).to(dtype)
        sh, sc = ((0.1 * torch.randn(64, 1024, device=dev, generator=g)).to(dtype) for _ in range(2))
        yield f"layer {dtype}", (lambda x, sh, sc: ops.norm_modulate(x, sh, sc, "layer", eps=1e-6)), (x, sh, sc)
    x = torch.randn(256, 128, 2048, device=dev, generator=g)
    w, b = torch.ones(128, device=dev), torch.zeros(128, device=dev)
    sh, sc = (0.1 * torch.randn(256, 128, device=dev, generator=g) for _ in range(2))
    yield "group32+silu", (lambda x, sh, sc: ops.norm_modulate(x, sh, sc, "group", w, b, 1e-5, "silu", 32)), (x, sh, sc)


for name, op, inputs in cases():
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    gy = torch.randn_like(inputs[0])
    step = lambda: torch.autograd.grad(op(*leaves), leaves, gy)  # noqa: E731
    ref = _registry._IMPLS["norm_modulate"]["torch"]
    for backend in ("triton", "compile"):
        if backend == "compile":
            _registry._IMPLS["norm_modulate"]["torch"] = _registry.Impl(torch.compile(ref.fn, dynamic=False), ref.can_use)
        try:
            with use_backend("torch" if backend == "compile" else backend):
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        step()
                    torch.cuda.synchronize()
        finally:
            _registry._IMPLS["norm_modulate"]["torch"] = ref
        print(f"===== {name} {backend} (5 fwd+bwd)", flush=True)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70), flush=True)
