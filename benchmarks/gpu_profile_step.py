"""GPU only: where a `small` joint training step's time goes, per dispatch (reference vs the
default fused backends): step wall time, and the top ops by self CPU time and by CUDA time
(torch.profiler). Launch overhead shows as CPU time far above CUDA time.

    python benchmarks/gpu_profile_step.py [dit|resnet]
"""
from __future__ import annotations

import contextlib
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from flowfm_fast.models import FlowFM, get_config
from flowfm_fast.train.loop import make_optimizer
from flowfm_fast.ops import use_backend

velocity = sys.argv[1] if len(sys.argv) > 1 else "dit"
dev = torch.device("cuda")
torch.manual_seed(0)
model = FlowFM(get_config("small", velocity=velocity)).to(dev)
opt = make_optimizer(model, lr=1e-4, weight_decay=0.01)  # the trainer's (fused) AdamW
x1 = torch.randn(64, 3, 300, device=dev)


def step():
    loss = model.loss(x1)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


for backend in ("torch", None):
    ctx = use_backend(backend) if backend else contextlib.nullcontext()
    with ctx:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 10
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
    name = backend or "default"
    print(f"\n===== {velocity} {name}: {wall * 1e3:.2f} ms/step")
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
    try:
        print(ka.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))
    except Exception:  # older torch names it after CUDA
        print(ka.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
