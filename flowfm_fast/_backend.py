"""Which optional backends are importable, said once.

The compiled extension ``flowfm_fast._C`` is optional: the package works on the reference path
without it. A missing extension is normal (no compiler, ``FLOWFM_BUILD_EXT=0``) and only logged;
one that exists but fails to load (stale build against another torch) warns once.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import warnings

log = logging.getLogger("flowfm_fast")


# Must equal FLOWFM_ABI_VERSION in csrc/version.h: an extension built from other sources is stale.
EXPECTED_ABI = 7

_REBUILD = "Rebuild with `pip install --no-build-isolation -e .`"


def _load_extension():
    if importlib.util.find_spec("flowfm_fast._C") is None:
        if os.environ.get("FLOWFM_BUILD_EXT", "1") != "0":  # skipped on purpose: nothing to say
            warnings.warn("flowfm_fast._C is not built; CPU ops run on the (slower) reference backend. "
                          + _REBUILD + " with a C++ compiler present.", RuntimeWarning, stacklevel=2)
        return None, "not built"
    try:
        import torch  # noqa: F401  (the extension links against libtorch)
        from . import _C
    except Exception as exc:  # ABI-mismatched build: fall back, but say so once
        warnings.warn(f"flowfm_fast._C failed to load ({exc}); using the reference backend. {_REBUILD}.",
                      RuntimeWarning, stacklevel=2)
        return None, f"failed to load: {exc}"
    abi = getattr(_C, "ABI_VERSION", None)
    if abi != EXPECTED_ABI:
        warnings.warn(f"flowfm_fast._C is stale (ABI {abi}, this package needs {EXPECTED_ABI}); using the "
                      f"reference backend. {_REBUILD}.", RuntimeWarning, stacklevel=2)
        return None, f"stale (ABI {abi} != {EXPECTED_ABI})"
    return _C, "loaded"


def interpreting() -> bool:
    """Triton kernels run on the CPU in its interpreter (``TRITON_INTERPRET=1``, set before triton is
    first imported, which is when triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_status() -> str:
    return "installed" if importlib.util.find_spec("triton") is not None else "not installed"


extension, _ext_status = _load_extension()

# The variant of the C++ CPU kernels in use (csrc/common/cpu_capability.h): "default" (baseline
# x86-64 / aarch64), "avx2" (AVX2 + FMA) or "avx512". Kept here as a plain string because the
# registry reads it on every call (its cache key).
CPU_CAPABILITY_NAMES = ("default", "avx2", "avx512")
_cpu_capability = extension.cpu_capability() if extension is not None else "default"


def cpu_capability() -> str:
    """The CPU kernel variant the C++ ops run with (``"default"`` without the extension)."""
    return _cpu_capability


def cpu_capabilities() -> tuple[str, ...]:
    """The variants this build compiled and this CPU can run, lowest first."""
    return tuple(extension.cpu_capabilities()) if extension is not None else ("default",)


def set_cpu_capability(name: str, *, source: str = "capability") -> None:
    """Run the C++ CPU kernels' ``name`` variant from now on (what ``FLOWFM_CPU_CAPABILITY``
    chooses at start-up); raises ValueError naming ``source`` if this build or CPU lacks it."""
    global _cpu_capability
    choice = str(name).strip().lower()
    if choice not in CPU_CAPABILITY_NAMES:
        raise ValueError(f"{source} must be one of {', '.join(CPU_CAPABILITY_NAMES)}, got {name!r}")
    if choice not in cpu_capabilities():
        why = ("the C++ extension is not loaded" if extension is None else
               f"this CPU and build offer {', '.join(cpu_capabilities())} "
               f"(build: {extension.cpu_capability_build()})")
        raise ValueError(f"{source}={name!r} is not available: {why}")
    if extension is not None:
        extension.set_cpu_capability(choice)
    _cpu_capability = choice


if os.environ.get("FLOWFM_CPU_CAPABILITY", "").strip() and extension is not None:
    set_cpu_capability(os.environ["FLOWFM_CPU_CAPABILITY"], source="FLOWFM_CPU_CAPABILITY")


def backend_summary() -> str:
    """One line saying which backends this process can use."""
    import torch
    cuda = "available" if torch.cuda.is_available() else "not available"
    # The registry reads FLOWFM_BACKEND at import too (and checks it); this module sits below it.
    forced = os.environ.get("FLOWFM_BACKEND", "").strip().lower()
    return (f"flowfm_fast backends: reference=torch; C++ extension {_ext_status}; triton {_triton_status()}; "
            f"CUDA {cuda}; CPU kernels {cpu_capability()} of {', '.join(cpu_capabilities())}"
            + (f"; forced: {forced}" if forced else ""))


log.info(backend_summary())
