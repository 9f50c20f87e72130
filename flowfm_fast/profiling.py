"""Profiling: NVTX ranges for Nsight, and ``flowfm-fast profile`` (torch.profiler over a few
training steps and one K-step sampling, written as a Chrome trace plus a top-ops table).

NVTX ranges are on when ``FLOWFM_NVTX=1`` is set and CUDA is available; otherwise
:func:`nvtx_range` hands back one shared ``contextlib.nullcontext``, so a disabled range costs a
function call and a flag test (~0.2 µs) and never raises, CPU-only torch builds included.
The model code names its ranges:

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

This module sits below the models (they import :func:`nvtx_range`); the ``profile`` command
imports the rest of the package lazily.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
from pathlib import Path

import torch

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


# ----------------------------------------------------------------------------- flowfm-fast profile
def add_profile_parser(subparsers) -> argparse.ArgumentParser:
    from .integrate import METHODS
    from .models import CONFIG_NAMES
    q = subparsers.add_parser("profile", help="a few training steps and a K-step sampling under torch.profiler "
                                              "(Chrome trace + top-ops table)")
    q.add_argument("--config", default="small", choices=CONFIG_NAMES)
    q.add_argument("--velocity", default="dit", choices=("dit", "resnet"))
    q.add_argument("--batch", type=int, default=64, help="windows per training step and per sampling")
    q.add_argument("--steps", type=int, default=3, help="profiled training steps")
    q.add_argument("--warmup", type=int, default=1, help="unprofiled training steps and samplings first")
    q.add_argument("--sample-steps", type=int, default=8, help="K of the profiled sampling")
    q.add_argument("--method", default="euler", choices=METHODS)
    q.add_argument("--graph", action=argparse.BooleanOptionalAction, default=None,
                   help="sample as one CUDA-graph replay (default: on for CUDA; no effect on CPU)")
    q.add_argument("--rows", type=int, default=30, help="rows per top-ops table")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", default="runs/profile")
    q.add_argument("--device", default="auto")
    q.set_defaults(fn=run_profile)
    return q


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


def run_profile(a) -> int:
    from torch.profiler import ProfilerActivity, profile

    from .cli import _device
    from .data import AugmentConfig, Standardizer, augment, make_synthetic
    from .models import FlowFM, get_config
    from .train.loop import TrainConfig, make_optimizer

    for name in ("batch", "steps", "sample_steps", "rows"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if a.warmup < 0:
        raise ValueError("--warmup must be >= 0")
    dev = _device(a.device)
    cfg = get_config(a.config, velocity=a.velocity)
    torch.manual_seed(a.seed)
    model = FlowFM(cfg).to(dev)
    tc = TrainConfig()
    # The optimizer pretraining uses (same groups and settings), so its step costs the same.
    opt = make_optimizer(model, tc.lr, tc.weight_decay)
    raw = make_synthetic(n=a.batch, channels=cfg.channels, length=cfg.length, seed=a.seed).x
    std = Standardizer.fit(raw)
    x1 = torch.as_tensor(std.apply(raw), dtype=torch.float32, device=dev)
    mean = torch.as_tensor(std.mean, dtype=torch.float32, device=dev)
    scale = torch.as_tensor(std.std, dtype=torch.float32, device=dev)
    gen = torch.Generator(device=dev).manual_seed(a.seed)
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
            return model.sample(z, steps=a.sample_steps, method=a.method, generator=gen, graph=a.graph)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    # Warm-up outside the profiler: first-call costs (allocator, Triton compiles, graph capture).
    model.train()
    for _ in range(a.warmup):
        train_step()
    model.eval()
    for _ in range(a.warmup):
        sample()
    sync()

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        model.train()
        for _ in range(a.steps):
            train_step()
        sync()
        model.eval()
        sample()
        sync()

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    trace, top = out / "trace.json", out / "top_ops.txt"
    prof.export_chrome_trace(str(trace))
    header = (f"flowfm-fast profile: config={a.config} velocity={a.velocity} batch={a.batch} device={dev} "
              f"train steps={a.steps} sampling={a.method} x {a.sample_steps}")
    top.write_text(header + "\n" + top_ops_text(prof.key_averages(), a.rows, cuda=dev.type == "cuda"))
    print(json.dumps({"trace": str(trace), "top_ops": str(top), "device": str(dev)}))
    return 0
