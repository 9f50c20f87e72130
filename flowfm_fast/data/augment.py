"""Encoder-side augmentation of x1: random 3-D rotation (each xyz triad, one rotation per
window), amplitude scaling and jitter. Rotation acts on physical units, so standardised windows
are mapped back, rotated and re-standardised.

What the generator rebuilds is a choice (``target``): the clean window (the default, FlowFM's
recipe: z must ignore the pose the augmentation changed, which is what makes it a good feature for
recognising activities) or the augmented window the encoder saw (z must then keep the pose, which
is what a faithful reconstruction x -> z -> x needs)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class AugmentConfig:
    max_angle_deg: float = 30.0
    scale_low: float = 0.8
    scale_high: float = 1.2
    jitter_std: float = 0.05
    enabled: bool = True
    target: str = "clean"   # what the generator rebuilds: "clean" x1 or the "augmented" window

    TARGETS = ("clean", "augmented")

    def __post_init__(self):
        if self.target not in self.TARGETS:
            raise ValueError(f"augment target must be one of {self.TARGETS}, got {self.target!r}")
        if not 0.0 <= self.max_angle_deg <= 180.0:
            raise ValueError(f"max_angle_deg must lie in [0, 180], got {self.max_angle_deg}")
        if not 0.0 < self.scale_low <= self.scale_high:
            raise ValueError(f"scale_low / scale_high must satisfy 0 < scale_low <= scale_high, "
                             f"got {self.scale_low} / {self.scale_high}")
        if not self.jitter_std >= 0.0:
            raise ValueError(f"jitter_std must be >= 0, got {self.jitter_std}")


def random_rotations(n: int, max_angle: float, generator=None, device=None) -> torch.Tensor:
    """(n, 3, 3) rotations about uniformly random axes by angles uniform in [0, max_angle] (rad)."""
    axis = torch.randn(n, 3, generator=generator, device=device)
    axis = axis / axis.norm(dim=1, keepdim=True).clamp_min(1e-8)
    angle = torch.rand(n, generator=generator, device=device) * max_angle
    kx, ky, kz = axis.unbind(1)
    zero = torch.zeros_like(kx)
    K = torch.stack([zero, -kz, ky, kz, zero, -kx, -ky, kx, zero], 1).reshape(n, 3, 3)
    s, c = torch.sin(angle)[:, None, None], torch.cos(angle)[:, None, None]
    eye = torch.eye(3, device=device).expand(n, 3, 3)
    return eye + s * K + (1 - c) * (K @ K)   # Rodrigues


def augment(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, cfg: AugmentConfig, generator=None):
    """Augmented copy of standardised windows x (B, C, L); C must be a multiple of 3 to rotate."""
    if not cfg.enabled:
        return x
    B, C, _ = x.shape
    m, s = mean.view(1, C, 1), std.view(1, C, 1)
    raw = x * s + m
    if C % 3 == 0 and cfg.max_angle_deg > 0:
        R = random_rotations(B, math.radians(cfg.max_angle_deg), generator, x.device).to(x.dtype)
        raw = torch.cat([R @ raw[:, i:i + 3] for i in range(0, C, 3)], dim=1)
    scale = torch.empty(B, 1, 1, device=x.device, dtype=x.dtype).uniform_(cfg.scale_low, cfg.scale_high,
                                                                         generator=generator)
    raw = raw * scale
    out = (raw - m) / s
    if cfg.jitter_std > 0:
        out = out + cfg.jitter_std * torch.randn(out.shape, generator=generator, device=x.device, dtype=x.dtype)
    return out
