"""SSL-Wearables-style 1-D ResNet encoder: pre-activation residual blocks (k = 5), a stride-2
downsampling at the start of every stage after the first, global average pooling (or averages over
``pool_segments`` equal time segments, which keep coarse timing), E(x) -> z."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..nn import BatchNorm1d
from ..nvtx import nvtx_range
from .configs import EncoderConfig


class PreActBlock(nn.Module):
    """``x + conv(relu(bn(conv(relu(bn(x))))))`` with a 1x1 projection when shape changes (each
    ``relu(bn(.))`` is one fused BatchNorm1d(act="relu"), same state_dict as nn.BatchNorm1d)."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int):
        super().__init__()
        self.bn1, self.bn2 = BatchNorm1d(c_in, act="relu"), BatchNorm1d(c_out, act="relu")
        self.conv1 = nn.Conv1d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False)
        self.conv2 = nn.Conv1d(c_out, c_out, k, padding=k // 2, bias=False)
        self.skip = (nn.Conv1d(c_in, c_out, 1, stride=stride, bias=False)
                     if (c_in != c_out or stride != 1) else nn.Identity())

    def forward(self, x):
        h = self.bn1(x)
        skip = self.skip(h) if not isinstance(self.skip, nn.Identity) else x
        h = self.conv1(h)
        h = self.conv2(self.bn2(h))
        return skip + h


class ResNet1DEncoder(nn.Module):
    """(B, C, L) windows -> (B, z_dim) representations."""

    def __init__(self, in_channels: int, cfg: EncoderConfig):
        super().__init__()
        k = cfg.kernel_size
        w0 = cfg.widths[0]
        self.stem = nn.Conv1d(in_channels, w0, k, padding=k // 2, bias=False)
        blocks, c = [], w0
        for i, w in enumerate(cfg.widths):
            for j in range(cfg.blocks_per_stage):
                blocks.append(PreActBlock(c, w, k, stride=2 if (i > 0 and j == 0) else 1))
                c = w
        self.blocks = nn.Sequential(*blocks)
        self.out_norm = BatchNorm1d(c, act="relu")
        self.segments = cfg.pool_segments
        self.head = nn.Linear(c * self.segments, cfg.z_dim)
        self.z_dim = cfg.z_dim

    def _feature_map(self, x):
        return self.out_norm(self.blocks(self.stem(x)))

    def features(self, x):
        """Globally pooled pre-projection features (B, widths[-1])."""
        return self._feature_map(x).mean(dim=-1)

    def forward(self, x):
        with nvtx_range("encoder"):
            h = self._feature_map(x)
            pooled = h.mean(dim=-1) if self.segments == 1 else F.adaptive_avg_pool1d(h, self.segments).flatten(1)
            return self.head(pooled)
