"""flowfm_fast: fused kernels and a thin PyTorch API for FlowFM (joint encoder + flow matching)."""
from __future__ import annotations

__version__ = "0.1.0"

from . import ops  # noqa: E402  (registers the reference backend)
from ._backend import backend_summary, extension  # noqa: E402

__all__ = ["ops", "backend_summary", "extension", "__version__"]
