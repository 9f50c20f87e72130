"""User windows from .npy / .npz: x (B, C, L) with optional labels and subjects.

Nothing is unpickled: object arrays (and bare pickles named .npy) are refused. Each array's header
is read and checked (dtype, rank, size against the bytes actually there) before any of its data is
read, so a hostile header (say, 10^12 elements) fails fast without allocating.
An .npz holds ``x`` and optionally ``y`` (int labels in [-1, MAX_CLASSES), -1 = unlabelled) and
``subject``.
"""
from __future__ import annotations

import math
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .windows import WindowSet

MAX_ELEMENTS = 2 ** 31  # refuse absurd shapes before touching memory
MAX_CLASSES = 4096      # labels size the probe's classifier: a stray 10^9 must not

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members / an empty zip
# What reading a damaged or hostile file can raise outside the header parser (see _read_header):
# bad magic (ValueError), short reads (EOFError), zip damage (BadZipFile, zlib.error), encrypted or
# exotic zip members (RuntimeError / NotImplementedError from zipfile), and OverflowError for
# sizes no C integer holds.
_READ_ERRORS = (OSError, EOFError, ValueError, TypeError, OverflowError, zipfile.BadZipFile, zlib.error,
                RuntimeError, NotImplementedError)


class DataError(ValueError):
    """A data file that cannot be used; the message says which file and why."""


def _read_header(fp, where: str, name: str):
    """(shape, fortran_order, dtype) of the .npy stream at ``fp``; leaves ``fp`` at the data."""
    version = np.lib.format.read_magic(fp)
    if version not in ((1, 0), (2, 0)):  # 3.0 only differs for unicode field names, refused anyway
        raise DataError(f"{where}: {name} has an unsupported .npy format version {version}")
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    try:
        shape, fortran, dtype = read(fp)
    except (EOFError, OSError, zipfile.BadZipFile, zlib.error):
        raise
    except Exception as exc:  # noqa: BLE001 - numpy parses a hostile header with ast and tokenize,
        # which raise more than ValueError (tokenize.TokenError, SyntaxError, RecursionError, ...)
        raise DataError(f"{where}: {name} has an unreadable .npy header ({type(exc).__name__}: {exc})") from None
    if any(d < 0 for d in shape):
        raise DataError(f"{where}: {name} has a negative dimension in its header {shape}")
    return shape, fortran, dtype


def _read_array(fp, available: int, where: str, name: str, kinds: str, ndim: int) -> np.ndarray:
    """Read one .npy stream whose header must say dtype kind in ``kinds`` and rank ``ndim``.

    ``available`` is the stream's size in bytes; the header is checked against it first."""
    start = fp.tell()
    shape, fortran, dtype = _read_header(fp, where, name)
    if dtype.hasobject:
        raise DataError(f"{where}: {name} holds Python objects, which are refused (no unpickling); "
                        "save numeric arrays")
    if dtype.kind not in kinds or dtype.fields is not None or dtype.subdtype is not None:
        want = "a numeric" if "f" in kinds else "an integer"
        raise DataError(f"{where}: {name} must be {want} array, got dtype {dtype}")
    if len(shape) != ndim:
        want = "(B, C, L)" if ndim == 3 else "(B,)"
        raise DataError(f"{where}: {name} must have shape {want}, got {shape}")
    count = math.prod(shape)  # Python ints: a hostile header cannot overflow it
    if count > MAX_ELEMENTS:
        raise DataError(f"{where}: {name} is too large ({count} elements in {shape}; at most {MAX_ELEMENTS})")
    need = count * dtype.itemsize
    have = available - (fp.tell() - start)
    if have < need:
        raise DataError(f"{where}: {name} is truncated: its header promises {need} bytes of data, "
                        f"{max(have, 0)} are there")
    buf = bytearray(need)  # writable, unlike np.frombuffer over bytes
    got = fp.readinto(buf)
    if got != need:
        raise DataError(f"{where}: {name} is truncated: read {got} of {need} bytes of data")
    return np.frombuffer(buf, dtype).reshape(shape, order="F" if fortran else "C")


def _check_x(x: np.ndarray, where: str, channels: int | None, length: int | None) -> np.ndarray:
    if x.size == 0:
        raise DataError(f"{where}: x has no windows (shape {x.shape})")
    if channels is not None and x.shape[1] != channels:
        raise DataError(f"{where}: x has {x.shape[1]} channels, expected {channels}")
    if length is not None and x.shape[2] != length:
        raise DataError(f"{where}: x has windows of length {x.shape[2]}, expected {length}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise DataError(f"{where}: x contains NaN or Inf")
    with np.errstate(over="ignore"):  # overflow is reported below, as a clear error
        x = np.ascontiguousarray(x.astype(np.float32, copy=False))  # Fortran-order files too
    if not np.isfinite(x).all():
        raise DataError(f"{where}: x has values beyond the float32 range (they would become Inf)")
    return x


def _check_vec(v: np.ndarray, name: str, n: int, where: str) -> np.ndarray:
    if v.shape[0] != n:
        raise DataError(f"{where}: {name} must have shape ({n},), one per window, got {v.shape}")
    v = v.astype(np.int64)
    if name == "y" and len(v) and (v.min() < -1 or v.max() >= MAX_CLASSES):
        raise DataError(f"{where}: y must hold class labels in [-1, {MAX_CLASSES}) (-1 = unlabelled), "
                        f"got values in [{v.min()}, {v.max()}]")
    return v


def _load_npy(p: Path, where: str):
    with open(p, "rb") as fp:
        x = _read_array(fp, os.fstat(fp.fileno()).st_size, where, "x", "fiu", 3)
    return x, None, None


def _load_npz(p: Path, where: str):
    with zipfile.ZipFile(p) as z:
        members = {n[:-4]: n for n in z.namelist() if n.endswith(".npy")}
        if "x" not in members:
            raise DataError(f"{where}: an .npz must hold an array named 'x' (has {sorted(members)})")

        def read(key, kinds, ndim):
            info = z.getinfo(members[key])
            if info.flag_bits & 0x1:
                raise DataError(f"{where}: {key} is encrypted")
            with z.open(info) as fp:
                a = _read_array(fp, info.file_size, where, key, kinds, ndim)
                while fp.read(1 << 20):  # read to the member's end, where zipfile checks its CRC
                    pass
            return a

        x = read("x", "fiu", 3)
        y = read("y", "iu", 1) if "y" in members else None
        s = read("subject", "iu", 1) if "subject" in members else None
    return x, y, s


def load_windows(path, channels: int | None = None, length: int | None = None) -> WindowSet:
    """Read and validate windows from ``path`` (.npy: x only; .npz: x, y?, subject?).

    Raises :class:`DataError` (a ValueError) naming the file for anything unusable."""
    p = Path(path)
    where = str(p)
    if not p.is_file():
        raise DataError(f"{where}: no such file")
    try:
        with open(p, "rb") as fp:
            magic = fp.read(len(_NPY_MAGIC))
        if magic.startswith(_NPY_MAGIC):
            x, y, s = _load_npy(p, where)
        elif magic[:4] in _ZIP_MAGICS:
            x, y, s = _load_npz(p, where)
        else:
            raise DataError(f"{where}: not a .npy or .npz file (a pickle or other format is refused)")
    except DataError:
        raise
    except _READ_ERRORS as exc:
        raise DataError(f"{where}: not a readable .npy/.npz file ({type(exc).__name__}: {exc})") from None
    x = _check_x(x, where, channels, length)
    y = None if y is None else _check_vec(y, "y", x.shape[0], where)
    s = None if s is None else _check_vec(s, "subject", x.shape[0], where)
    return WindowSet(x, y, s)
