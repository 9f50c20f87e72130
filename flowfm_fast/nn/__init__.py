"""Thin modules over :mod:`flowfm_fast.ops`; each docstring gives the math in one line."""
from .layers import AdaLNModulation, FlowMatchingLoss, GatedResidual, NormModulate, TimestepEmbedder

__all__ = ["AdaLNModulation", "FlowMatchingLoss", "GatedResidual", "NormModulate", "TimestepEmbedder"]
