"""Drop-in LayerNorm / GroupNorm / RMSNorm on :func:`flowfm_fast.ops.norm_modulate`, and BatchNorm1d
(with an optional fused ReLU) on :func:`flowfm_fast.ops.batch_norm_act`.

Each is a subclass of its ``torch.nn`` counterpart: same constructor arguments, parameters,
state_dict keys and ``extra_repr``; only ``forward`` differs (the fused kernels of the selected
backend, statistics in fp32). :func:`convert` swaps the plain modules inside any model in place.

    >>> model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16))
    >>> convert(model)[1]
    LayerNorm((16,), eps=1e-05, elementwise_affine=True)
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..ops._validate import choice
from ..ops.batch_norm_act import ACTS as BN_ACTS


class LayerNorm(nn.LayerNorm):
    """``y = (x - mean) / sqrt(var + eps) * weight + bias`` over the last dim (torch.nn.LayerNorm).

    Any leading shape; runs the fused op when ``normalized_shape`` is one dim (the transformer
    case), and torch's own forward otherwise (several normalised dims, or an empty input).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) != 1 or x.dim() < 1 or x.numel() == 0:
            return super().forward(x)
        d = x.shape[-1]
        y = ops.norm_modulate(x.reshape(-1, d), kind="layer", weight=self.weight, bias=self.bias, eps=self.eps)
        return y.reshape(x.shape)


class RMSNorm(nn.RMSNorm):
    """``y = x / sqrt(mean(x^2) + eps) * weight`` over the last dim (torch.nn.RMSNorm). eps None is
    the machine epsilon of the compute dtype, as in torch: fp32's for fp32 / bf16 / fp16 inputs
    (not ``finfo(bf16).eps``, which would be 2^-7), fp64's for fp64."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) != 1 or x.dim() < 1 or x.numel() == 0:
            return super().forward(x)
        eps = self.eps
        if eps is None:
            eps = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
        d = x.shape[-1]
        y = ops.norm_modulate(x.reshape(-1, d), kind="rms", weight=self.weight, eps=eps)
        return y.reshape(x.shape)


class GroupNorm(nn.GroupNorm):
    """``y = (x - mean_g) / sqrt(var_g + eps) * weight_c + bias_c``, statistics per sample over
    each group of C / num_groups channels and all positions (torch.nn.GroupNorm; input (N, C, *))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.numel() == 0:
            return super().forward(x)
        y = ops.norm_modulate(x.reshape(x.shape[0], x.shape[1], -1), kind="group", weight=self.weight,
                              bias=self.bias, eps=self.eps, num_groups=self.num_groups)
        return y.reshape(x.shape)


class BatchNorm1d(nn.BatchNorm1d):
    """``y = act((x - mean_c) / sqrt(var_c + eps) * weight_c + bias_c)`` (torch.nn.BatchNorm1d, then
    ``act``: None or ``"relu"``); input (N, C) or (N, C, L). Running statistics, momentum (None: a
    cumulative average), ``num_batches_tracked`` and train / eval behave as in torch.nn.BatchNorm1d.
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` sees an ``nn.BatchNorm1d`` and would drop ``act``:
    for synchronised statistics keep act=None and apply the ReLU after it.
    """

    act: str | None = None  # also what a module swapped in by convert() has

    def __init__(self, *args, act: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        choice("act", act, BN_ACTS)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        # torch.nn.BatchNorm1d.forward's bookkeeping, then the fused op instead of F.batch_norm.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        return ops.batch_norm_act(x, self.running_mean if use_running else None,
                                  self.running_var if use_running else None, self.weight, self.bias,
                                  bn_training, factor, self.eps, self.act)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", act={self.act!r}" if self.act else "")


_SWAPS = {nn.LayerNorm: LayerNorm, nn.RMSNorm: RMSNorm, nn.GroupNorm: GroupNorm, nn.BatchNorm1d: BatchNorm1d}


def convert(model: nn.Module) -> nn.Module:
    """Swap every plain ``torch.nn`` LayerNorm / GroupNorm / RMSNorm / BatchNorm1d inside ``model`` for its
    drop-in here, in place, and return ``model``.

    The swap changes only each module's class: its parameters stay the same objects (an optimizer
    built before still holds them), as do buffers, hooks and state_dict keys. Subclasses of the
    torch.nn norms are left alone, since their forward may do something else.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        new_cls = _SWAPS.get(type(module))
        if new_cls is not None:
            module.__class__ = new_cls
    return model
