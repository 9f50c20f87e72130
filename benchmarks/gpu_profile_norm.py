"""GPU only: where the time of one norm_modulate forward + backward goes, per kernel (torch.profiler,
CUDA activity), for the triton backend and torch.compile of the reference, at the tuning shapes.

    python benchmarks/gpu_profile_norm.py
"""
from __future__ import annotations

import contextlib

import torch
from torch.profiler import ProfilerActivity, profile

from flowfm_fast.ops import _registry, use_backend
from gpu_cases import norm_cases

dev = torch.device("cuda")
for name, op, inputs in norm_cases(dev):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    gy = torch.randn_like(inputs[0])
    step = lambda: torch.autograd.grad(op(*leaves), leaves, gy)  # noqa: E731
    ref = _registry.impl_for("norm_modulate", "torch")
    for backend in ("triton", "compile"):
        swap = (_registry.override("norm_modulate", "torch", torch.compile(ref.fn, dynamic=False))
                if backend == "compile" else contextlib.nullcontext())
        with swap, use_backend("torch" if backend == "compile" else backend):
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    step()
                torch.cuda.synchronize()
        print(f"===== {name} {backend} (5 fwd+bwd)", flush=True)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70), flush=True)
