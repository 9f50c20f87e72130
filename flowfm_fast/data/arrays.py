"""User windows from .npy / .npz: x (B, C, L) with optional labels and subjects.

Files are read with ``allow_pickle=False``: an object array is refused, never unpickled.
An .npz holds ``x`` and optionally ``y`` (int labels, -1 = unlabelled) and ``subject``.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .windows import WindowSet

MAX_ELEMENTS = 2 ** 31  # refuse absurd shapes before touching memory


class DataError(ValueError):
    """A data file that cannot be used; the message says which file and why."""


def _check_x(x, where: str, channels: int | None, length: int | None) -> np.ndarray:
    if x.dtype.kind not in "fiu":
        raise DataError(f"{where}: x must be a numeric array, got dtype {x.dtype}")
    if x.ndim != 3:
        raise DataError(f"{where}: x must have shape (B, C, L), got {x.shape}")
    if x.size == 0:
        raise DataError(f"{where}: x has no windows (shape {x.shape})")
    if x.size > MAX_ELEMENTS:
        raise DataError(f"{where}: x is too large ({x.size} elements)")
    if channels is not None and x.shape[1] != channels:
        raise DataError(f"{where}: x has {x.shape[1]} channels, expected {channels}")
    if length is not None and x.shape[2] != length:
        raise DataError(f"{where}: x has windows of length {x.shape[2]}, expected {length}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise DataError(f"{where}: x contains NaN or Inf")
    return x


def _check_vec(v, name: str, n: int, where: str) -> np.ndarray:
    if v.dtype.kind not in "iu" or v.ndim != 1 or v.shape[0] != n:
        raise DataError(f"{where}: {name} must be an integer array of shape ({n},), got {v.dtype} {v.shape}")
    return v.astype(np.int64)


def _unreadable(where: str, exc: Exception) -> DataError:
    if "allow_pickle" in str(exc):  # object arrays need pickle: refused, never unpickled
        return DataError(f"{where}: holds Python objects, which are refused (no unpickling); save numeric arrays")
    return DataError(f"{where}: not a readable .npy/.npz file ({type(exc).__name__}: {exc})")


def load_windows(path, channels: int | None = None, length: int | None = None) -> WindowSet:
    """Read and validate windows from ``path`` (.npy: x only; .npz: x, y?, subject?)."""
    p = Path(path)
    where = str(p)
    if not p.is_file():
        raise DataError(f"{where}: no such file")
    try:
        loaded = np.load(p, allow_pickle=False, mmap_mode=None)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise _unreadable(where, exc) from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded as z:
            if "x" not in z.files:
                raise DataError(f"{where}: an .npz must hold an array named 'x' (has {z.files})")
            try:
                x, y = z["x"], (z["y"] if "y" in z.files else None)
                s = z["subject"] if "subject" in z.files else None
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
                raise _unreadable(where, exc) from None
    else:
        x, y, s = loaded, None, None
    x = _check_x(x, where, channels, length)
    y = None if y is None else _check_vec(y, "y", x.shape[0], where)
    s = None if s is None else _check_vec(s, "subject", x.shape[0], where)
    return WindowSet(x, y, s)
