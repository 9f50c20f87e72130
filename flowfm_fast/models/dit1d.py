"""DiT-1D velocity network: patchify, adaLN-Zero transformer blocks, modulated final norm.

Each block's residual update is fused with the next norm: ``gated_residual_norm_modulate``
returns both the new residual stream and the next sub-layer's modulated input.
"""
from __future__ import annotations


import torch
from torch import nn

from .. import ops
from ..nn import AdaLNModulation, Linear
from ..nvtx import nvtx_range
from .configs import DiTConfig
from .velocity import ConditionedVelocity

EPS = 1e-6


def sincos_positions(n: int, dim: int) -> torch.Tensor:
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    k = torch.arange(dim // 2, dtype=torch.float32)[None, :]
    ang = pos / (10000.0 ** (k / max(dim // 2, 1)))
    pe = torch.zeros(n, dim)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(ang), torch.cos(ang)[:, : dim - dim // 2]
    return pe


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        # flowfm_fast.nn.Linear: the token GEMMs (B T rows) are most of a training step on a CPU;
        # same parameters and state_dict keys as nn.Linear.
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)
        hidden = int(dim * mlp_ratio)
        self.fc1, self.fc2 = Linear(dim, hidden, act="gelu_tanh"), Linear(hidden, dim)
        self.adaLN = AdaLNModulation(dim, dim, 6)

    def attention(self, h):
        B, T, D = h.shape
        q, k, v = self.qkv(h).reshape(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = ops.attention(q, k, v)  # = F.scaled_dot_product_attention(q, k, v); cpp: short-sequence kernel
        return self.proj(a.transpose(1, 2).reshape(B, T, D))

    def mlp(self, h):
        return self.fc2(self.fc1(h))  # fc1 applies GELU-tanh


class DiT1D(ConditionedVelocity):
    def __init__(self, channels: int, length: int, z_dim: int, cfg: DiTConfig):
        super().__init__(cfg.dim, z_dim)
        self.channels, self.patch = channels, cfg.patch
        self.patchify = nn.Conv1d(channels, cfg.dim, cfg.patch, stride=cfg.patch)
        self.register_buffer("pos", sincos_positions(length // cfg.patch, cfg.dim)[None], persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self._block_ranges = tuple(f"dit.block{i}" for i in range(cfg.depth))   # NVTX names, built once
        self.final_adaLN = AdaLNModulation(cfg.dim, cfg.dim, 2)
        self.out = Linear(cfg.dim, cfg.patch * channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        for m in [self.patchify, *[b.qkv for b in self.blocks], *[b.proj for b in self.blocks]]:
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

    def embed(self, x):
        """``self.patchify(x).transpose(1, 2)`` as one GEMM over (B T, C patch) rows: a Conv1d with
        kernel = stride = patch is exactly that product, and ATen runs the convolution through its
        slow im2col path at batch 1, where the GEMM is a few microseconds."""
        B, C, L = x.shape
        T = L // self.patch
        patches = x[..., : T * self.patch].reshape(B, C, T, self.patch).transpose(1, 2).reshape(B, T, C * self.patch)
        return ops.linear_act(patches, self.patchify.weight.reshape(self.patchify.out_channels, -1),
                              self.patchify.bias)

    def modulations(self, c):
        mods = []
        for blk in self.blocks:
            mods.extend(blk.adaLN(c))
        mods.extend(self.final_adaLN(c))
        return tuple(mods)

    def forward_modulated(self, x, mods):
        B, C, L = x.shape
        tokens = self.embed(x) + self.pos                             # (B, T, D)
        shift1, scale1 = mods[0], mods[1]
        h = ops.norm_modulate(tokens, shift1, scale1, "layer", eps=EPS)
        res = tokens
        n = len(self.blocks)
        for i, blk in enumerate(self.blocks):
            with nvtx_range(self._block_ranges[i]):
                _, _, gate1, shift2, scale2, gate2 = mods[6 * i: 6 * i + 6]
                res, h = ops.gated_residual_norm_modulate(res, blk.attention(h), gate1, shift2, scale2, "layer",
                                                          eps=EPS)
                # The MLP's residual is fused with the next sub-layer's norm (next block, or the final norm).
                nshift, nscale = (mods[6 * (i + 1)], mods[6 * (i + 1) + 1]) if i + 1 < n else (mods[-2], mods[-1])
                res, h = ops.gated_residual_norm_modulate(res, blk.mlp(h), gate2, nshift, nscale, "layer", eps=EPS)
        out = self.out(h)                                              # (B, T, patch * C)
        return out.reshape(B, -1, self.patch, C).permute(0, 3, 1, 2).reshape(B, C, L)
