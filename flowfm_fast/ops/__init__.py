"""Functional ops. Each dispatches per call through :mod:`flowfm_fast.ops._registry`:
the ``torch`` reference is always there; fused backends register themselves when importable."""
from ._registry import backends_for, describe, forced_backend, use_backend
from .attention import attention
from .batch_norm_act import batch_norm_act
from .fm_interpolate import fm_interpolate
from .fm_loss import fm_loss
from .gated_residual import gated_residual, gated_residual_norm_modulate
from .integrator_update import euler_step_, rk_combine
from .linear_act import linear_act
from .norm_modulate import norm_modulate
from .timestep_embedding import timestep_embedding

__all__ = [
    "attention", "backends_for", "batch_norm_act", "describe", "euler_step_", "fm_interpolate", "fm_loss", "forced_backend",
    "gated_residual", "gated_residual_norm_modulate", "linear_act", "norm_modulate", "rk_combine",
    "timestep_embedding", "use_backend",
]
