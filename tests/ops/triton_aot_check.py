"""Compile Triton kernels ahead of time for a GPU target, without a GPU (run as a script, with
TRITON_INTERPRET unset: under the interpreter ``triton.jit`` gives no compilable function).

The interpreter runs kernels in numpy and so misses what only the compiler checks (types of
scalar arguments, constexpr branches, lowering to PTX). Each case names a kernel, the types of its
runtime arguments (the rest are constexprs) and the constexpr values. Prints one line per failure
and exits 1 if any kernel did not compile (77 if there is no ptxas to compile with).
"""
from __future__ import annotations

import os
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from flowfm_fast.kernels import fm_interpolate as FI
from flowfm_fast.kernels import fm_loss as FL
from flowfm_fast.kernels import integrator_update as IU
from flowfm_fast.kernels import timestep_embedding as TE

NO_TOOLCHAIN = 77   # exit status: nothing to compile with (the caller skips)


def _cases():
    for acc, ptr in ((tl.float32, "*fp32"), (tl.float32, "*bf16"), (tl.float64, "*fp64")):
        a = "*fp64" if acc == tl.float64 else "*fp32"
        ints = lambda *names: {n: "i32" for n in names}  # noqa: E731
        yield FI.fm_path_fwd, dict(x0_ptr=ptr, x1_ptr="*fp16", t_ptr=a, xt_ptr=ptr, ut_ptr=ptr, c_hi="fp32", c_lo="fp32",
                                   **ints("B", "N", "s_x0", "s_x1")), dict(ACC=acc, BLOCK_B=2, BLOCK_N=1024)
        yield FI.fm_path_bwd, dict(dxt_ptr=ptr, dut_ptr=ptr, x0_ptr=ptr, x1_ptr=ptr, t_ptr=a, dx0_ptr=ptr,
                                   dx1_ptr=ptr, dt_part_ptr=a, c_hi="fp32", c_lo="fp32",
                                   **ints("B", "N", "s_dxt", "s_dut", "s_x0", "s_x1")), \
            dict(ACC=acc, HAS_DXT=True, HAS_DUT=False, NEED_DT=True, BLOCK_B=2, BLOCK_N=1024)
        yield FL.fm_loss_partials, dict(v_ptr=ptr, x0_ptr=ptr, x1_ptr=ptr, w_ptr="*bf16", dv_ptr=a, part_ptr=a,
                                        c_hi="fp32", c_lo="fp32", dvs_hi="fp32", dvs_lo="fp32", **ints("B", "N", "s_v", "s_x0", "s_x1")), \
            dict(ACC=acc, HAS_W=True, WRITE_DV=True, BLOCK_B=2, BLOCK_N=1024)
        yield FL.fm_loss_reduce, dict(part_ptr=a, w_ptr=ptr, per_sample_ptr=a, loss_ptr=a, inv_n_hi="fp32", inv_n_lo="fp32",
                                      inv_b_hi="fp32", inv_b_lo="fp32", **ints("B", "P")), \
            dict(ACC=acc, HAS_W=True, BLOCK_B=256, BLOCK_P=8)
        yield IU.euler_step, dict(x_ptr=ptr, v_ptr="*fp32", n="i32", dt_hi="fp32", dt_lo="fp32"), dict(ACC=acc, BLOCK=2048)
        yield IU.weighted_stage_sum, dict(out_ptr=ptr, x_ptr=ptr, k0=ptr, k1=ptr, k2="*fp32", k3=ptr, n="i32",
                                          **{f"c{i}_{h}": "fp32" for i in range(4) for h in ("hi", "lo")}), \
            dict(STAGES=3, ACC=acc, BLOCK=2048)
    for tp in ("*fp32", "*i64"):
        yield TE.sinusoidal_fwd, dict(t_ptr=tp, out_ptr="*fp32", neg_log_period_over_half="fp32",
                                      **{n: "i32" for n in ("N", "HALF", "DIM", "s_t")}), \
            dict(ODD=True, BLOCK_N=16, BLOCK_K=128)
        yield TE.sinusoidal_bwd, dict(demb_ptr="*fp32", t_ptr=tp, dt_ptr="*fp32", neg_log_period_over_half="fp32",
                                      **{n: "i32" for n in ("N", "HALF", "s_t", "s_d0", "s_d1")}), \
            dict(BLOCK_N=16, BLOCK_K=128)


def compile_case(fn, sig, consts, target):
    names = fn.arg_names
    signature = {n: sig.get(n, "constexpr") for n in names}
    unknown = set(consts) - set(names) | set(sig) - set(names)
    if unknown:
        raise ValueError(f"{fn.__name__} has no arguments {sorted(unknown)}")
    return triton.compile(ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in consts.items()}),
                          target=target)


def main(arch: int) -> int:
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "unset TRITON_INTERPRET to compile"
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        get_ptxas(arch).path
    except Exception as exc:  # no CUDA backend or no ptxas in this triton
        print(f"NO-PTXAS {type(exc).__name__}: {exc}")
        return NO_TOOLCHAIN
    target = GPUTarget("cuda", arch, 32)
    failed = 0
    for fn, sig, consts in _cases():
        try:
            compile_case(fn, sig, consts, target)
        except Exception as exc:  # report every kernel, not just the first
            failed += 1
            print(f"FAIL {fn.__name__} {sig} {consts}: {type(exc).__name__}: {exc}"[:2000])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
