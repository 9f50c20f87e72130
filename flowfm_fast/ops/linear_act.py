"""Linear layer with a fused activation: ``y = act(x @ weight.T + bias)``.

x is (..., K), weight (N, K), bias (N,) or None; y is (..., N) in x's dtype (x, weight and bias
share one dtype, as ``F.linear`` asks). ``act``: None, ``"silu"`` or ``"gelu_tanh"``. Under
autocast the op does what ``F.linear`` does: it runs in the autocast dtype.

The ``cpp`` backend runs problems from ~4M multiply-adds (``DNN_MIN_WORK``) through its own path,
and fp32 problems below that from ``GEMM_SMALL_MIN_ROWS`` rows where its AVX2 / AVX-512 kernels run:
fp32 GEMMs through its own register-tiled kernel or oneDNN, whichever measured faster per GEMM and
CPU capability (csrc/linear_act/cpu_kernels.h), other dtypes through ATen, the activation fused with
the extension's vectorised kernels, and a backward that computes only the gradients asked for;
other calls run the reference. On GPUs the ``triton`` backend's linear_act is the reference itself (cuBLAS is the GEMM, and a
Triton GEMM would not beat it at these shapes; fusing the activation into its epilogue is left to
torch.compile): registered so that a model run under ``use_backend("triton")`` works end to end.

Contract: fp32 within GEMM rounding of this reference (the summation order differs: relative
~1e-6 * sqrt(K)); bf16/fp16 within their rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend
from . import _ext, _triton
from . import _validate as V
from ._registry import register, select
from ._spec import KernelSpec, empty
from .norm_modulate import ACTS, apply_act

OP = "linear_act"
# M N K multiply-adds from which the cpp backend runs its own path (its GEMM or oneDNN's, our
# activation kernels) at any dtype; below, the call takes the reference unless the small GEMM
# (next) takes it. = kDnnMinWork in csrc/linear_act/cpu_kernels.h, which applies the same split to
# direct calls of the op.
DNN_MIN_WORK = 1 << 22
# Below DNN_MIN_WORK the cpp backend's AVX2 / AVX-512 variants run fp32 problems of at least this many
# rows through their own register-tiled GEMM (kGemmSmallMinRows in csrc/linear_act/cpu_kernels.h):
# the DiT's token GEMMs when sampling at batch 1. One row (a matrix-vector product) stays with ATen's.
GEMM_SMALL_MIN_ROWS = 2


@register(OP, "torch")
def linear_act_reference(x, weight, bias, act):
    return apply_act(F.linear(x, weight, bias), act)


_CPP_BUILT = _ext.has_kernel(OP, "cpp")


def runs_reference(x, weight) -> bool:
    """Whether this call is the reference's computation on every backend: off the CPU always (the
    triton backend is the reference), and without the C++ extension; with it, below DNN_MIN_WORK
    unless the cpp backend's small GEMM takes the call (fp32, from GEMM_SMALL_MIN_ROWS rows, an AVX2
    or AVX-512 kernel variant running)."""
    if x.device.type != "cpu" or not _CPP_BUILT:
        return True
    rows = x.numel() // x.shape[-1]
    if rows * weight.numel() >= DNN_MIN_WORK:
        return False
    return not (rows >= GEMM_SMALL_MIN_ROWS and x.dtype == torch.float32 and _backend.cpu_capability() != "default")


# ---------------------------------------------------------------- compiled (cpp) backend
def _fake(x, weight, bias, act):
    y = x.new_empty((x.shape[0], weight.shape[0]))
    return y, (x.new_empty(y.shape) if act != "none" else x.new_empty((0,)))


def _backward_fake(dy, x, weight, u, act, need_x, need_weight, need_bias):
    none = x.new_empty((0,))
    return (empty(x) if need_x else none, weight.new_empty(weight.shape) if need_weight else none,
            x.new_empty((weight.shape[0],)) if need_bias else none)


# The C++ extension's ops only (autograd in csrc/linear_act/autograd.cpp); no Triton kernel.
BACKWARD = KernelSpec("linear_act_backward",
                      "(Tensor dy, Tensor x, Tensor weight, Tensor u, str act, bool need_x, bool need_weight, "
                      "bool need_bias) -> (Tensor dx, Tensor dweight, Tensor dbias)", _backward_fake)
FORWARD = KernelSpec("linear_act", "(Tensor x, Tensor weight, Tensor? bias, str act) -> (Tensor y, Tensor u)",
                     _fake, backward=BACKWARD)

# cpp: benchmarks/results/cpu-2core.md (AVX-512) and cpu-avx2-2core.md (avx2 variant). On GPUs the
# "triton" backend is the reference itself (see above), ranked as the reference.
RANKS = {"cpp": {"cpu": 1}, "triton": {"cuda": 0}}

_ext.bind(BACKWARD)
if (_compiled := _ext.bind(FORWARD)) is not None:
    def _linear_act_compiled(x, weight, bias, act):
        if runs_reference(x, weight):
            # The C++ op would call ATen's GEMM itself here; the reference is that computation
            # without the custom-op round trip (~5 us a call: 16 calls a DiT step, 8 steps a solve).
            return linear_act_reference(x, weight, bias, act)
        rows = x.reshape(-1, x.shape[-1])
        y = _compiled(rows, weight, bias, act or "none")[0]
        return y.reshape(*x.shape[:-1], weight.shape[0])

    _ext.register_compiled(OP, FORWARD.name, _linear_act_compiled, RANKS)


# ---------------------------------------------------------------- triton backend: the reference (see above)
_triton.register_triton(OP, linear_act_reference, RANKS["triton"])


def validate(x, weight, bias, act):
    V.choice("act", act, ACTS)
    V.tensor("weight", weight, 2)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must have shape (..., {weight.shape[1]}) (last dimension = weight's in_features), "
                         f"got {tuple(x.shape)}")
    if bias is not None:
        V.tensor("bias", bias, 1)
        V.shape("bias", bias, (weight.shape[0],), "one per output feature")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    V.same_device("x", x, weight=weight, bias=bias)


def _autocast(x, weight, bias):
    """What autocast does to F.linear's arguments: float32/16 tensors to the autocast dtype."""
    dt = torch.get_autocast_dtype(x.device.type)
    cast = lambda t: (t if not isinstance(t, torch.Tensor) or t.dtype in (dt, torch.float64)  # noqa: E731
                      else t.to(dt))
    return cast(x), cast(weight), cast(bias)


def linear_act(x, weight, bias=None, act=None) -> torch.Tensor:
    """``act(x @ weight.T + bias)``; see the module docstring."""
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
        x, weight, bias = _autocast(x, weight, bias)
    validate(x, weight, bias, act)
    if x.numel() == 0:  # an empty batch: nothing for a kernel to do
        return linear_act_reference(x, weight, bias, act)
    return select(OP, x).fn(x, weight, bias, act)
