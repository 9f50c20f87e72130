"""What every conditioned velocity network shares: c = TimeMLP(timestep_embedding(t)) + Linear(z).

A network splits its forward into ``modulations(c)`` (everything that depends only on the
conditioning: the adaLN / FiLM tensors) and ``forward_modulated(x, mods)``. A fixed-grid solve
then computes the modulations of every stage time at once with :meth:`prepare`, and its loop runs
only the blocks.
"""
from __future__ import annotations

import torch
from torch import nn

from ..nn import Linear, TimestepEmbedder


class ConditionedVelocity(nn.Module):
    """Base class: ``v(x, t, z)`` with t (B,) in [0, 1] and z (B, z_dim)."""

    def __init__(self, cond_dim: int, z_dim: int):
        super().__init__()
        self.t_embedder = TimestepEmbedder(cond_dim)
        self.z_proj = Linear(z_dim, cond_dim)

    def condition(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.t_embedder(t) + self.z_proj(z)

    def modulations(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def forward_modulated(self, x: torch.Tensor, mods: tuple[torch.Tensor, ...]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.forward_modulated(x, self.modulations(self.condition(t, z)))

    def prepare(self, stage_times: torch.Tensor, z: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """Modulations for each of S stage times (shared by the batch), in one batched pass.

        Returns S tuples of (B, ...) views; the time MLP runs on S rows and the z projection once.
        """
        S, B = stage_times.shape[0], z.shape[0]
        c = self.t_embedder(stage_times)[:, None, :] + self.z_proj(z)[None, :, :]
        mods = self.modulations(c.reshape(S * B, -1))
        per_stage = [m.reshape(S, B, *m.shape[1:]) for m in mods]
        return [tuple(m[s] for m in per_stage) for s in range(S)]
