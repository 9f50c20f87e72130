from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops._registry import forced_backend
from ..ops._validate import choice
from ..ops.linear_act import runs_reference
from ..ops.norm_modulate import ACTS, apply_act


class Linear(nn.Linear):
    """``y = act(x @ weight.T + bias)``: ``nn.Linear`` with a fused activation (ops.linear_act).

    Same parameters and state_dict keys as ``nn.Linear``, so checkpoints of either load into the other.
    It is an ``nn.Linear``: tools that rewrite ``nn.Linear`` modules by type (LoRA wrappers, quantisers)
    see one and may drop ``act``; use ``act=None`` there.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        act (keyword only): None, ``"silu"`` or ``"gelu_tanh"``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 act: str | None = None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        choice("act", act, ACTS)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if forced_backend() is None and runs_reference(x, self.weight):
            # What every backend runs for this call (see ops.linear_act), minus the op's validation and
            # dispatch (~9 us a call). act was checked here.
            return apply_act(F.linear(x, self.weight, self.bias), self.act)
        return ops.linear_act(x, self.weight, self.bias, self.act)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", act={self.act!r}" if self.act else "")


class TimestepEmbedder(nn.Module):
    """``c_t = Linear(SiLU(Linear(timestep_embedding(t_scale * t, freq_dim))))`` (DiT's embedder).

    Args:
        dim: output width.
        freq_dim: width of the sinusoidal features.
        t_scale: multiplies t first; 1000 maps flow time [0, 1] onto DiT's usual [0, 1000] range.
        max_period: longest sinusoid period.
    """

    def __init__(self, dim: int, freq_dim: int = 256, t_scale: float = 1000.0, max_period: float = 10000.0):
        super().__init__()
        self.freq_dim, self.t_scale, self.max_period = freq_dim, t_scale, max_period
        self.mlp = nn.Sequential(Linear(freq_dim, dim), nn.SiLU(), Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = ops.timestep_embedding(t.float() * self.t_scale, self.freq_dim, self.max_period)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class AdaLNModulation(nn.Module):
    """``(m_1, ..., m_n) = chunk(Linear(SiLU(c)), n)``, zero-initialised (adaLN-Zero).

    Args:
        cond_dim: width of the conditioning vector c.
        dim: width of each modulation tensor.
        n_chunks: how many tensors (6 for a DiT block: shift/scale/gate twice).
    """

    def __init__(self, cond_dim: int, dim: int, n_chunks: int):
        super().__init__()
        self.n_chunks = n_chunks
        self.linear = Linear(cond_dim, n_chunks * dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(nn.functional.silu(c)).chunk(self.n_chunks, dim=-1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # DiT spells this layer nn.Sequential(nn.SiLU(), nn.Linear(...)): its keys "1.weight" /
        # "1.bias" load here as "linear.weight" / "linear.bias".
        for name in ("weight", "bias"):
            dit_key = f"{prefix}1.{name}"
            if dit_key in state_dict and f"{prefix}linear.{name}" not in state_dict:
                state_dict[f"{prefix}linear.{name}"] = state_dict.pop(dit_key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class NormModulate(nn.Module):
    """``y = act(norm(x) * (1 + scale) + shift)``, norm = LayerNorm, RMSNorm or GroupNorm.

    Args:
        num_features: D (tokens) or C (GroupNorm).
        kind: ``"layer"``, ``"rms"`` or ``"group"``.
        eps: added to the variance.
        act: None, ``"silu"`` or ``"gelu_tanh"``.
        elementwise_affine: learn the norm's own weight (and bias, except for rms).
        num_groups: groups for ``kind="group"``.
    """

    def __init__(self, num_features: int, kind: str = "layer", eps: float = 1e-6, act: str | None = None,
                 elementwise_affine: bool = False, num_groups: int = 32):
        super().__init__()
        self.kind, self.eps, self.act, self.num_groups = kind, eps, act, num_groups
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features)) if kind != "rms" else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x, shift=None, scale=None):
        return ops.norm_modulate(x, shift, scale, self.kind, self.weight, self.bias, self.eps, self.act,
                                 self.num_groups)


class GatedResidual(nn.Module):
    """``res + gate * h`` with gate (B, D) broadcast over tokens (adaLN-Zero's residual)."""

    def forward(self, res, h, gate):
        return ops.gated_residual(res, h, gate)


class FlowMatchingLoss(nn.Module):
    """``mean_b w_b * mean (v - (x1 - (1 - sigma_min) x0))^2``.

    Args:
        sigma_min: the path's final noise level s (0 gives the straight rectified-flow path).
    """

    def __init__(self, sigma_min: float = 0.0):
        super().__init__()
        self.sigma_min = sigma_min

    def forward(self, v, x0, x1, t, weight=None):
        return ops.fm_loss(v, x0, x1, t, weight, self.sigma_min)
