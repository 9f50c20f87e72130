"""``flowfm-fast profile``'s work: torch.profiler over a few training steps and one K-step sampling,
written as a Chrome trace plus a top-ops table.

An application module, beside :mod:`flowfm_fast.compare` and :mod:`flowfm_fast.demo`: it builds a
model, an optimizer and synthetic data, so it sits above models, data and train; the command's
arguments are parsed and checked in :mod:`flowfm_fast.cli`. The NVTX ranges the model code emits
for Nsight live in the leaf :mod:`flowfm_fast.nvtx`.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from .data import AugmentConfig, Standardizer, augment, make_synthetic
from .models import FlowFM, get_config
from .nvtx import nvtx_range
from .train.loop import TrainConfig, make_optimizer


@contextlib.contextmanager
def _phase(name: str):
    """A named span in both the torch.profiler trace and Nsight."""
    with torch.profiler.record_function(name), nvtx_range(name):
        yield


def top_ops_text(averages, rows: int, cuda: bool) -> str:
    """torch.profiler's op table sorted by self CPU time, and by self CUDA time when ``cuda``."""
    sorts = [("self CPU time", "self_cpu_time_total")] + ([("self CUDA time", "self_cuda_time_total")] if cuda else [])
    return "".join(f"\n== top {rows} ops by {title} ==\n{averages.table(sort_by=key, row_limit=rows)}\n"
                   for title, key in sorts)


def run_profile(out: Path, device: torch.device, *, config: str = "small", velocity: str = "dit", batch: int = 64,
                steps: int = 3, warmup: int = 1, sample_steps: int = 8, method: str = "euler",
                graph: bool | None = None, rows: int = 30, seed: int = 0) -> dict:
    """Profile ``steps`` pretraining steps and one ``sample_steps``-step sampling of a freshly built
    ``config`` model on ``batch`` synthetic windows, after ``warmup`` unprofiled rounds of each.

    Args:
        out: directory to write ``trace.json`` (Chrome trace) and ``top_ops.txt`` into.
        device: where the model runs (bf16 autocast on CUDA, as in pretraining).
        config, velocity: the model (:func:`flowfm_fast.models.get_config`).
        method, graph: the integrator and whether to replay the solve as one CUDA graph.
        rows: rows per top-ops table.

    Returns:
        ``{"trace": path, "top_ops": path, "device": str}``.
    """
    dev = torch.device(device)
    cfg = get_config(config, velocity=velocity)
    torch.manual_seed(seed)
    model = FlowFM(cfg).to(dev)
    tc = TrainConfig()
    # The optimizer pretraining uses (same groups and settings), so its step costs the same.
    opt = make_optimizer(model, tc.lr, tc.weight_decay)
    raw = make_synthetic(n=batch, channels=cfg.channels, length=cfg.length, seed=seed).x
    std = Standardizer.fit(raw)
    x1 = torch.as_tensor(std.apply(raw), dtype=torch.float32, device=dev)
    mean = torch.as_tensor(std.mean, dtype=torch.float32, device=dev)
    scale = torch.as_tensor(std.std, dtype=torch.float32, device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    aug = AugmentConfig()
    use_amp = dev.type == "cuda"   # as in pretraining: bf16 autocast on CUDA

    def train_step():
        with _phase("train.step"):
            x_enc = augment(x1, mean, scale, aug, gen)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = model.loss(x1, x_enc, generator=gen)
            opt.zero_grad(set_to_none=True)
            with _phase("train.backward"):
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            with _phase("train.optimizer_step"):
                opt.step()

    def sample():
        with _phase("sample"), torch.no_grad():
            z = model.encode(x1)
            return model.sample(z, steps=sample_steps, method=method, generator=gen, graph=graph)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    # Warm-up outside the profiler: first-call costs (allocator, Triton compiles, graph capture).
    model.train()
    for _ in range(warmup):
        train_step()
    model.eval()
    for _ in range(warmup):
        sample()
    sync()

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        model.train()
        for _ in range(steps):
            train_step()
        sync()
        model.eval()
        sample()
        sync()

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trace, top = out / "trace.json", out / "top_ops.txt"
    prof.export_chrome_trace(str(trace))
    header = (f"flowfm-fast profile: config={config} velocity={velocity} batch={batch} device={dev} "
              f"train steps={steps} sampling={method} x {sample_steps}")
    top.write_text(header + "\n" + top_ops_text(prof.key_averages(), rows, cuda=dev.type == "cuda"))
    return {"trace": str(trace), "top_ops": str(top), "device": str(dev)}
