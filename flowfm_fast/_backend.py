"""Which optional backends are importable, said once.

The compiled extension ``flowfm_fast._C`` is optional: the package works on the reference path
without it. A missing extension is normal (no compiler, ``FLOWFM_BUILD_EXT=0``) and only logged;
one that exists but fails to load (stale build against another torch) warns once.
"""
from __future__ import annotations

import importlib.util
import logging
import warnings

log = logging.getLogger("flowfm_fast")


def _load_extension():
    if importlib.util.find_spec("flowfm_fast._C") is None:
        return None, "not built"
    try:
        import torch  # noqa: F401  (the extension links against libtorch)
        from . import _C
        return _C, "loaded"
    except Exception as exc:  # stale or ABI-mismatched build: fall back, but say so once
        warnings.warn(f"flowfm_fast._C failed to load ({exc}); using the reference backend. "
                      "Rebuild with `pip install --no-build-isolation -e .`.", RuntimeWarning, stacklevel=2)
        return None, f"failed to load: {exc}"


def _triton_status() -> str:
    return "installed" if importlib.util.find_spec("triton") is not None else "not installed"


extension, _ext_status = _load_extension()


def backend_summary() -> str:
    """One line saying which backends this process can use."""
    import torch
    from .ops import _registry
    cuda = "available" if torch.cuda.is_available() else "not available"
    forced = _registry.forced_backend()
    return (f"flowfm_fast backends: reference=torch; C++ extension {_ext_status}; triton {_triton_status()}; "
            f"CUDA {cuda}" + (f"; forced: {forced}" if forced else ""))


log.info(backend_summary())
