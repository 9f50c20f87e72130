"""ResNet-1D velocity network: the classic time-series diffusion block, at full resolution,
``x + conv(act(GN(conv(act(GN(x) FiLM))) FiLM))`` with growing dilation; norm, FiLM and SiLU are
one ``norm_modulate(kind="group", act="silu")`` call."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..nn import AdaLNModulation
from ..nvtx import nvtx_range
from .configs import ResNetGenConfig
from .velocity import ConditionedVelocity

EPS = 1e-5


class FiLMBlock(nn.Module):
    def __init__(self, width: int, cond_dim: int, groups: int, k: int, dilation: int):
        super().__init__()
        self.groups = groups
        self.gn1_weight, self.gn1_bias = nn.Parameter(torch.ones(width)), nn.Parameter(torch.zeros(width))
        self.gn2_weight, self.gn2_bias = nn.Parameter(torch.ones(width)), nn.Parameter(torch.zeros(width))
        pad = dilation * (k // 2)
        self.conv1 = nn.Conv1d(width, width, k, padding=pad, dilation=dilation)
        self.conv2 = nn.Conv1d(width, width, k, padding=pad, dilation=dilation)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.film = AdaLNModulation(cond_dim, width, 4)

    def forward(self, x, shift1, scale1, shift2, scale2):
        h = ops.norm_modulate(x, shift1, scale1, "group", self.gn1_weight, self.gn1_bias, EPS, "silu", self.groups)
        h = self.conv1(h)
        h = ops.norm_modulate(h, shift2, scale2, "group", self.gn2_weight, self.gn2_bias, EPS, "silu", self.groups)
        return x + self.conv2(h)


class ResNet1DGenerator(ConditionedVelocity):
    def __init__(self, channels: int, z_dim: int, cfg: ResNetGenConfig):
        cond_dim = 4 * cfg.width
        super().__init__(cond_dim, z_dim)
        self.groups = cfg.groups
        self.inp = nn.Conv1d(channels, cfg.width, cfg.kernel_size, padding=cfg.kernel_size // 2)
        self.blocks = nn.ModuleList(
            FiLMBlock(cfg.width, cond_dim, cfg.groups, cfg.kernel_size, 2 ** (i % 4)) for i in range(cfg.depth))
        self._block_ranges = tuple(f"resnet.block{i}" for i in range(cfg.depth))   # NVTX names, built once
        self.out_weight, self.out_bias = nn.Parameter(torch.ones(cfg.width)), nn.Parameter(torch.zeros(cfg.width))
        self.out = nn.Conv1d(cfg.width, channels, cfg.kernel_size, padding=cfg.kernel_size // 2)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def modulations(self, c):
        mods = []
        for blk in self.blocks:
            mods.extend(blk.film(c))
        return tuple(mods)

    def forward_modulated(self, x, mods):
        h = self.inp(x)
        for i, blk in enumerate(self.blocks):
            with nvtx_range(self._block_ranges[i]):
                h = blk(h, *mods[4 * i: 4 * i + 4])
        h = ops.norm_modulate(h, None, None, "group", self.out_weight, self.out_bias, EPS, "silu", self.groups)
        return self.out(h)
