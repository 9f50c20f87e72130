"""Thin modules over :mod:`flowfm_fast.ops`; each docstring gives the math in one line."""
from .layers import AdaLNModulation, FlowMatchingLoss, GatedResidual, Linear, NormModulate, TimestepEmbedder
from .norms import BatchNorm1d, GroupNorm, LayerNorm, RMSNorm, convert

__all__ = ["AdaLNModulation", "BatchNorm1d", "FlowMatchingLoss", "GatedResidual", "GroupNorm", "LayerNorm", "Linear", "NormModulate",
           "RMSNorm", "TimestepEmbedder", "convert"]
