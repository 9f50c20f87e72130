"""Compile every Triton kernel of the norm family for sm_90 (PTX and cubin), without a GPU.

The interpreter runs kernels as Python, so it accepts code the compiler would reject; this script
sends each kernel through the real front end, LLVM and ptxas for every activation, both norm
kinds, and each accumulation dtype. Run with TRITON_INTERPRET unset (the test does so in a
subprocess): ``python tests/ops/triton_compile_norm.py [--quick] [kernel names]``. Prints one
line per kernel variant.
"""
from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("run without TRITON_INTERPRET=1: this compiles the kernels")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from flowfm_fast.kernels import gated_residual as GR  # noqa: E402
from flowfm_fast.kernels import norm_group as NG  # noqa: E402
from flowfm_fast.kernels import norm_tokens as NT  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
# Tensors that have x's dtype; every other pointer is an fp32 parameter, statistic or partial.
DATA = {"X", "Y", "DX", "DY", "RES", "H", "OUT", "NEW_RES", "DRES", "DH", "DNEW_RES"}
FLOATS = {"eps"}
INTS = {"B", "T", "D", "R", "C", "L", "G", "BG"}  # sizes; every other upper-case name is a pointer


def compile_kernel(kernel, data_dtype: str, **constexprs) -> str:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.isupper() and name not in INTS:
            sig[name] = "*" + (data_dtype if name in DATA else "fp32")
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    compiled = triton.compile(ASTSource(kernel, sig, constexprs), target=TARGET)
    assert "cubin" in compiled.asm
    return f"{kernel.fn.__name__}[{data_dtype}, {constexprs}] ok"


def main(argv: list[str]) -> int:
    quick = "--quick" in argv  # one dtype and one activation: the test's budget
    only = [a for a in argv if not a.startswith("--")]
    flags = dict(HAS_SHIFT=True, HAS_SCALE=True, HAS_W=True, HAS_BIAS=True)
    variants = []
    dtypes = ((tl.float32, "bf16"),) if quick else ((tl.float32, "bf16"), (tl.float32, "fp32"), (tl.float64, "fp64"))
    for acc, data in dtypes:
        for act in (2,) if quick else (0, 1, 2):
            for rms in (False, True):
                tok = dict(RMS=rms, ACT=act, ACC=acc, **flags)
                variants.append((NT._token_fwd, data, dict(tok, BLOCK_R=4, BLOCK_D=128)))
                variants.append((NT._token_bwd, data, dict(tok, BLOCK_B=2, BLOCK_T=4, BLOCK_D=128)))
                variants.append((GR._grnm_fwd, data, dict(tok, BLOCK_R=4, BLOCK_D=128)))
                variants.append((GR._grnm_bwd, data, dict(tok, HAS_DNEW=True, BLOCK_B=2, BLOCK_T=4, BLOCK_D=128)))
            grp = dict(ACT=act, ACC=acc, **flags)
            variants.append((NG._group_fwd_whole, data, dict(grp, BLOCK_G=2, BLOCK_C=4, BLOCK_L=32)))
            variants.append((NG._group_bwd_whole, data, dict(grp, BLOCK_G=2, BLOCK_C=4, BLOCK_L=32)))
            variants.append((NG._group_fwd, data, dict(grp, BLOCK_C=4, BLOCK_L=32)))
            variants.append((NG._group_bwd, data, dict(grp, BLOCK_C=4, BLOCK_L=32)))
        variants.append((GR._gr_fwd, data, dict(ACC=acc, BLOCK_R=4, BLOCK_D=128)))
        variants.append((GR._gr_bwd, data, dict(ACC=acc, BLOCK_B=2, BLOCK_T=4, BLOCK_D=128)))
    # Absent optional tensors: their pointer arguments are None constexprs.
    none = dict(HAS_SHIFT=False, HAS_SCALE=False, HAS_W=False, HAS_BIAS=False,
                SHIFT=None, SCALE=None, W=None, BIAS=None)
    variants.append((NT._token_fwd, "fp16", dict(RMS=False, ACT=1, ACC=tl.float32, BLOCK_R=4, BLOCK_D=128, **none)))
    variants.append((NT._token_bwd, "fp16", dict(RMS=False, ACT=1, ACC=tl.float32, BLOCK_B=2, BLOCK_T=4,
                                                 BLOCK_D=128, DSHIFT_P=None, DSCALE_P=None, DW_P=None, DB_P=None,
                                                 **none)))
    variants.append((NG._group_bwd_whole, "fp16", dict(ACT=2, ACC=tl.float32, BLOCK_G=2, BLOCK_C=4, BLOCK_L=32,
                                                       DSHIFT=None, DSCALE=None, DW_P=None, DB_P=None, **none)))
    for kernel, data, constexprs in variants:
        if only and kernel.fn.__name__ not in only:
            continue
        print(compile_kernel(kernel, data, **constexprs), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
