"""The large-row norm cases the GPU scripts share (gpu_tune_norm.py, gpu_profile_norm.py): tokens
64x1024x1024 (fp32, bf16) with adaLN modulation, and GroupNorm + FiLM + SiLU on 256x128x2048."""
from __future__ import annotations

import torch

from flowfm_fast import ops


def norm_cases(dev: torch.device):
    """(name, op(x, shift, scale), (x, shift, scale)) per case."""
    g = torch.Generator(dev).manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(64, 1024, 1024, device=dev, generator=g).to(dtype)
        sh, sc = ((0.1 * torch.randn(64, 1024, device=dev, generator=g)).to(dtype) for _ in range(2))
        yield f"layer {dtype} 64x1024x1024", (lambda x, sh, sc: ops.norm_modulate(x, sh, sc, "layer", eps=1e-6)), (x, sh, sc)
    x = torch.randn(256, 128, 2048, device=dev, generator=g)
    w, b = torch.ones(128, device=dev), torch.zeros(128, device=dev)
    sh, sc = (0.1 * torch.randn(256, 128, device=dev, generator=g) for _ in range(2))
    yield ("group32+silu 256x128x2048",
           (lambda x, sh, sc: ops.norm_modulate(x, sh, sc, "group", w, b, 1e-5, "silu", 32)), (x, sh, sc))
