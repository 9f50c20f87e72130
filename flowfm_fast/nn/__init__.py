"""Thin modules over :mod:`flowfm_fast.ops`; each docstring gives the math in one line."""
from .layers import AdaLNModulation, FlowMatchingLoss, GatedResidual, Linear, NormModulate, TimestepEmbedder
from .norms import GroupNorm, LayerNorm, RMSNorm, convert

__all__ = ["AdaLNModulation", "FlowMatchingLoss", "GatedResidual", "GroupNorm", "LayerNorm", "Linear", "NormModulate",
           "RMSNorm", "TimestepEmbedder", "convert"]
