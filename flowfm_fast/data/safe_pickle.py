"""A whitelisting unpickler for the HAPT pickle (pandas 1.x DataFrames of numpy arrays).

Only numpy array reconstruction and inert stand-ins for the pandas containers are admitted; any
other global raises :class:`UnsafePickleError` before anything is called. The pickle is protocol 2,
written by Python 2-era pandas, so it names ``copy_reg`` / ``__builtin__``; Python 3 spellings
(``copyreg`` / ``builtins``) are admitted too.
"""
from __future__ import annotations

import codecs
import io
import pickle

import numpy as np

try:  # numpy >= 2 moved the module; the pickle names the old path
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside the whitelist."""


class _StandIn:
    """Inert record of a pandas object: keeps constructor args and pickled state, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state):
        self.state = state


class DataFrameStandIn(_StandIn):
    pass


class BlockManagerStandIn(_StandIn):
    pass


class IndexStandIn(_StandIn):
    pass


class RangeIndexStandIn(_StandIn):
    pass


_STANDINS = (DataFrameStandIn, BlockManagerStandIn, IndexStandIn, RangeIndexStandIn)


def _reconstructor(cls, base, state):
    """copyreg._reconstructor limited to our stand-ins (the real one instantiates any class)."""
    if cls not in _STANDINS or base is not object or state is not None:
        raise UnsafePickleError(f"refusing to reconstruct {cls!r} from {base!r}")
    return cls.__new__(cls)


def _new_index(cls, data):
    if cls not in (IndexStandIn, RangeIndexStandIn) or not isinstance(data, dict):
        raise UnsafePickleError(f"refusing _new_Index({cls!r}, ...)")
    idx = cls()
    idx.state = data
    return idx


def _encode(text, encoding="utf-8"):
    """_codecs.encode as protocol-2 pickles use it: turning latin-1 text back into bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refusing _codecs.encode(..., {encoding!r})")
    return codecs.encode(text, encoding)


def _ndarray_reconstruct(cls, shape, dtype_code):
    if cls is not np.ndarray:
        raise UnsafePickleError(f"refusing to reconstruct array subclass {cls!r}")
    return _np_reconstruct(cls, shape, dtype_code)


ALLOWED = {
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("__builtin__", "object"): object,
    ("builtins", "object"): object,
    ("__builtin__", "slice"): slice,
    ("builtins", "slice"): slice,
    ("_codecs", "encode"): _encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _ndarray_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _ndarray_reconstruct,
    ("pandas.core.frame", "DataFrame"): DataFrameStandIn,
    ("pandas.core.internals.managers", "BlockManager"): BlockManagerStandIn,
    ("pandas.core.indexes.base", "_new_Index"): _new_index,
    ("pandas.core.indexes.base", "Index"): IndexStandIn,
    ("pandas.core.indexes.range", "RangeIndex"): RangeIndexStandIn,
}


class WhitelistUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"pickle names {module}.{name}, which is not whitelisted") from None

    def persistent_load(self, pid):
        raise UnsafePickleError("persistent ids are not allowed")


def safe_loads(data: bytes):
    return WhitelistUnpickler(io.BytesIO(data)).load()


def dataframe_columns(df) -> dict[str, np.ndarray]:
    """Column name -> 1-D array, from a DataFrame stand-in (pandas 1.x BlockManager layout)."""
    if not isinstance(df, DataFrameStandIn) or not isinstance(df.state, dict):
        raise ValueError("expected a pickled pandas DataFrame")
    mgr = df.state.get("_data")
    if not isinstance(mgr, BlockManagerStandIn) or not isinstance(mgr.state, tuple) or len(mgr.state) < 3:
        raise ValueError("unexpected DataFrame layout in the pickle")
    _axes, block_values, block_items = mgr.state[:3]
    cols = {}
    for values, items in zip(block_values, block_items):
        names = items.state["data"]
        if not isinstance(values, np.ndarray) or values.ndim != 2 or values.shape[0] != len(names):
            raise ValueError("unexpected block shape in the pickle")
        for name, row in zip(names, values):
            cols[str(name)] = row
    return cols
