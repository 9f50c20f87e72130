"""Which fp32 GEMM should ``linear_act``'s cpp backend call? Its own kernel (``gemm_small`` in
csrc/linear_act/cpu_kernels.h, reached through the op) against the libraries it could call instead,
timed **interleaved** in one process (a fresh random order each round, medians), for the DiT's
token GEMMs: sampling at batch 1 (M = 30), the training step at batch 64 (M = 1920) and its adaLN
layer (M = 64). The measurement behind ``kGemmForwardAnySize`` and its neighbours.

- ``fwd``: ``flowfm::linear_act`` (no activation) vs ATen's ``addmm`` (MKL / OpenBLAS) vs oneDNN's
  ``mkldnn::_linear_pointwise``, the call the op made before.
- ``dW``: ``flowfm::linear_act_backward`` asked for the weight gradient only vs ``torch.mm(gu.t(), x)``
  (MKL reads the transposes in place) vs oneDNN on operands transposed *outside* the timing (its
  best case: the op paid for those copies).

    python benchmarks/compare_gemm.py                      # every shape, 30 rounds
    FLOWFM_CPU_CAPABILITY=avx2 python benchmarks/compare_gemm.py --rounds 50

Not collected by pytest (no ``bench_`` prefix): it compares the op's internal GEMM choices, which
the pytest-benchmark suites (op against eager and compile) do not.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from flowfm_fast import _backend
from flowfm_fast._malloc import tune_cpu_allocator

# (M, K, N): the DiT's qkv, proj, fc1, fc2 at M = 30 (batch 1) and M = 1920 (batch 64), its adaLN at M = 64.
SHAPES = [(30, 128, 384), (30, 128, 128), (30, 128, 512), (30, 512, 128),
          (1920, 128, 384), (1920, 128, 128), (1920, 128, 512), (1920, 512, 128), (64, 128, 768)]


def _dnn():
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    return op if op is not None and torch.backends.mkldnn.is_available() else None


def cases(M, K, N):
    """name -> {impl: callable} for one shape."""
    torch.manual_seed(0)
    x, w, b, gu = torch.randn(M, K), torch.randn(N, K) / K ** 0.5, torch.randn(N), torch.randn(M, N)
    fwd = {"ours": lambda: torch.ops.flowfm.linear_act(x, w, b, "none"),
           "aten": lambda: torch.addmm(b, x, w.t())}
    dw = {"ours": lambda: torch.ops.flowfm.linear_act_backward(gu, x, w, gu, "none", False, True, False),
          "aten": lambda: torch.mm(gu.t(), x)}
    dnn = _dnn()
    if dnn is not None:
        xt, gut = x.t().contiguous(), gu.t()
        fwd["onednn"] = lambda: dnn(x, w, b, "none", [], None)
        dw["onednn"] = lambda: dnn(xt, gut, None, "none", [], None)
    return {"fwd": fwd, "dW": dw}


def measure(fns, rounds: int, calls: int, seed: int = 0) -> dict[str, list[float]]:
    """Per-call ms of each callable, ``calls`` calls per sample, interleaved in a random order."""
    order, rng = list(fns), random.Random(seed)
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        rng.shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            for _ in range(calls):
                fns[k]()
            times[k].append((time.perf_counter() - t0) / calls * 1e3)
    return times


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as is)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {args.rounds}")
    tune_cpu_allocator()
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = [f"capability={_backend.cpu_capability()}, threads={torch.get_num_threads()}, rounds={args.rounds}", "",
             "| GEMM | M, K, N | ours ms | aten ms | onednn ms | ours GFLOP/s | ours vs aten | ours vs onednn |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    try:
        for M, K, N in SHAPES:
            calls = max(1, int(2e6 // (M * K * N)))
            for name, fns in cases(M, K, N).items():
                med = {k: statistics.median(v) for k, v in measure(fns, args.rounds, calls).items()}
                gflops = 2 * M * K * N / med["ours"] / 1e6
                dnn = med.get("onednn")
                lines.append(f"| {name} | {M}, {K}, {N} | {med['ours']:.4f} | {med['aten']:.4f} | "
                             + (f"{dnn:.4f}" if dnn else "-") + f" | {gflops:.0f} | {med['aten'] / med['ours']:.2f}x | "
                             + (f"{dnn / med['ours']:.2f}x" if dnn else "-") + " |")
                print(lines[-1], flush=True)
    finally:
        torch.set_num_threads(threads_before)
    return lines


if __name__ == "__main__":
    main()
