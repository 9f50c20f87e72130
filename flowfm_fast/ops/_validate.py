"""Input checks shared by every op: each error names the argument it is about."""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """The precision the references compute in: fp32 for fp32/bf16/fp16, float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def tensor(name: str, x, ndim: int | Sequence[int] | None = None, *, floating: bool = True) -> torch.Tensor:
    """``x`` is a tensor of a supported float dtype with the given rank(s), and not empty."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    return x


def same_device(ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def shape(name: str, x: torch.Tensor, expected: Sequence[int], what: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({what}), got {tuple(x.shape)}")


def written_in_place(name: str, x: torch.Tensor) -> None:
    """``x`` can take an in-place write: no two of its elements share memory (as in an expanded
    tensor, stride 0), and autograd allows it (not a leaf that requires grad)."""
    if any(st == 0 and n > 1 for st, n in zip(x.stride(), x.shape)):
        raise ValueError(f"{name} is written in place but some of its elements share memory (stride 0 in "
                         f"strides {tuple(x.stride())}, as from expand()); pass a contiguous tensor")
    if x.requires_grad and x.is_leaf and torch.is_grad_enabled():
        raise ValueError(f"{name} is written in place but is a leaf tensor that requires grad; "
                         "call under torch.no_grad() or pass a copy")


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()


def no_partial_overlap(out_name: str, out: torch.Tensor, **inputs) -> None:
    """Each input is ``out`` itself (same memory, same layout: an in-place update) or shares none of
    its bytes: a kernel that reads an input while writing a shifted view of it gets an order-dependent
    answer. Conservative for interleaved views (compares byte spans); skipped while torch.compile
    traces (fake tensors have no addresses)."""
    if torch.compiler.is_compiling() or out.device.type == "meta":
        return
    for name, t in inputs.items():
        if t.untyped_storage().data_ptr() != out.untyped_storage().data_ptr():
            continue
        if t.data_ptr() == out.data_ptr() and t.stride() == out.stride() and t.dtype == out.dtype:
            continue
        (a0, a1), (b0, b1) = _byte_span(out), _byte_span(t)
        if a0 < b1 and b0 < a1:
            raise ValueError(f"{out_name} is written while {name} is read, and they share memory without "
                             f"being the same tensor; pass {out_name} as {name} itself or a separate tensor")


_VALUE_CHECKS = True


@contextlib.contextmanager
def value_checks_off():
    """Inside the block, checks that read tensor values (one small device sync each) are skipped;
    shapes and dtypes are still checked. For code captured as a CUDA graph, which cannot read
    values back to the host (the captured training step draws its t itself, in range)."""
    global _VALUE_CHECKS
    before, _VALUE_CHECKS = _VALUE_CHECKS, False
    try:
        yield
    finally:
        _VALUE_CHECKS = before


def times(name: str, t, batch: int | None = None) -> torch.Tensor:
    """``t`` is a finite (B,) float tensor within [0, 1] (checking range costs one small sync; the value
    check is skipped while torch.compile traces and inside :func:`value_checks_off`, shapes and
    dtypes are still checked)."""
    tensor(name, t, 1)
    if batch is not None and t.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},) to match the batch, got {tuple(t.shape)}")
    if torch.compiler.is_compiling() or not _VALUE_CHECKS:
        # Reading values would break the graph (data-dependent); eager calls check them.
        return t
    if t.numel() == 0:
        return t
    # One reduction and one device sync: min and max propagate NaN, and +-inf fall outside [0, 1].
    lo, hi = (float(v) for v in torch.stack(torch.aminmax(t.detach())).tolist())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} must be finite")
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got values in [{lo:g}, {hi:g}]")
    return t


def sigma(name: str, s) -> float:
    if isinstance(s, bool) or not isinstance(s, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(s).__name__}")
    if not 0.0 <= float(s) < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {s}")
    return float(s)


def positive_float(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    if not float(v) > 0.0:
        raise ValueError(f"{name} must be > 0, got {v}")
    return float(v)


def choice(name: str, v, options: Sequence) -> None:
    if v not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {v!r}")


def norm_autocasts_to_fp32(device_type: str) -> bool:
    """Whether the built-in norms (layer_norm, group_norm, rms_norm) would run in fp32 here: under
    CUDA autocast they are on the fp32 list; CPU autocast leaves them in their input dtype."""
    return device_type == "cuda" and torch.is_autocast_enabled("cuda")
