"""Which CPU kernel variant of an op is fastest on this machine? Each case's reference and every
variant this build and CPU can run (``flowfm_fast._backend.set_cpu_capability``) timed
**interleaved** in one process, a fresh random order each round, medians; the measurement behind
an op's ``FLOWFM_CPU_AVX512_RUNS_AVX2`` (csrc/README.md, "CPU capabilities").

    python benchmarks/compare_cpu_variants.py                  # every case
    python benchmarks/compare_cpu_variants.py --case attention --rounds 100

Not collected by pytest (no ``bench_`` prefix): it compares variants of one backend against each
other, which the pytest-benchmark suites (one variant per process) do not.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from flowfm_fast import _backend, ops
from flowfm_fast._malloc import tune_cpu_allocator
from flowfm_fast.ops import use_backend


def _attention(B, H, hd, T=30):
    q, k, v = (t.detach().requires_grad_() for t in torch.randn(B, T, 3, H, hd).permute(2, 0, 3, 1, 4))
    return f"B={B},H={H},T={T},hd={hd}", lambda: ops.attention(q, k, v), (q, k, v)


def _norm_modulate(B, T, D):
    x, shift, scale = (torch.randn(*s).requires_grad_() for s in ((B, T, D), (B, D), (B, D)))
    return f"B={B},T={T},D={D}", lambda: ops.norm_modulate(x, shift, scale, "layer"), (x, shift, scale)


def _residual_norm(B, T, D):
    res, h, gate, shift, scale = (torch.randn(*s).requires_grad_() for s in ((B, T, D), (B, T, D), (B, D), (B, D),
                                                                            (B, D)))

    def fn():
        new_res, new_h = ops.gated_residual_norm_modulate(res, h, gate, shift, scale, "layer")
        return new_res + new_h  # one output to differentiate: both paths of the backward run
    return f"B={B},T={T},D={D}", fn, (res, h, gate, shift, scale)


def _group_norm_silu(B, C, L, G=8):
    x, w, b = (torch.randn(*s).requires_grad_() for s in ((B, C, L), (C,), (C,)))
    return f"B={B},C={C},L={L},G={G}", lambda: ops.norm_modulate(x, None, None, "group", w, b, 1e-5, "silu", G), (x, w, b)


def _batch_norm_relu(B, C, L):
    x, w, b = (torch.randn(*s).requires_grad_() for s in ((B, C, L), (C,), (C,)))
    mean, var = torch.zeros(C), torch.ones(C)
    return (f"B={B},C={C},L={L}", lambda: ops.batch_norm_act(x, mean, var, w, b, True, act="relu"), (x, w, b))


def _linear_gelu(M, K, N):
    x, w, b = torch.randn(M, K).requires_grad_(), (torch.randn(N, K) / K ** 0.5).requires_grad_(), \
        torch.randn(N).requires_grad_()
    return f"M={M},K={K},N={N}", lambda: ops.linear_act(x, w, b, "gelu_tanh"), (x, w, b)


# The ops with CPU kernels, at the small model's shapes (B = 64 training rows) and a larger one.
CASES = {
    "attention": [(_attention, (1, 4, 32)), (_attention, (64, 4, 32)), (_attention, (256, 4, 32)),
                  (_attention, (256, 6, 64))],
    "norm_modulate": [(_norm_modulate, (64, 30, 128)), (_norm_modulate, (256, 30, 256))],
    "gated_residual_norm_modulate": [(_residual_norm, (64, 30, 128)), (_residual_norm, (256, 30, 256))],
    "norm_modulate_group": [(_group_norm_silu, (64, 64, 300))],
    "batch_norm_act": [(_batch_norm_relu, (64, 32, 300))],
    "linear_act": [(_linear_gelu, (1920, 128, 512))],
}


def time_case(fn, inputs, mode: str, rounds: int, variants) -> dict[str, float]:
    """Median seconds per call of each variant ("reference" or a capability name); the capability
    in use before the call is in use after it."""
    out = fn()
    grad = torch.randn_like(out)

    def call():
        if mode == "fwd":
            with torch.no_grad():
                fn()
        else:
            torch.autograd.grad(fn(), inputs, grad)

    def run(variant):
        if variant != "reference":
            _backend.set_cpu_capability(variant)
        with use_backend("torch" if variant == "reference" else "cpp"):
            t0 = time.perf_counter()
            call()
            return time.perf_counter() - t0

    order, before = ["reference", *variants], _backend.cpu_capability()
    try:
        for v in order:  # warm-up, outside the timing
            for _ in range(3):
                run(v)
        times = {v: [] for v in order}
        for _ in range(rounds):
            random.shuffle(order)
            for v in order:
                times[v].append(run(v))
    finally:
        _backend.set_cpu_capability(before)
    return {v: statistics.median(t) for v, t in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), action="append", help="default: every case")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    tune_cpu_allocator()  # as the pytest suites (conftest.py): no page faults on each fresh output
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    variants = _backend.cpu_capabilities()
    print(f"torch {torch.__version__}, {args.threads} threads, variants {', '.join(variants)}, "
          f"{args.rounds} rounds, medians in ms (x: the reference's time over the variant's)\n")
    print("| case | mode | reference | " + " | ".join(variants) + " |")
    print("|---|---|---|" + "---|" * len(variants))
    try:
        for name in args.case or sorted(CASES):
            for make, shape in CASES[name]:
                label, fn, inputs = make(*shape)
                for mode in ("fwd", "fwd+bwd"):
                    med = time_case(fn, inputs, mode, args.rounds, variants)
                    ref = med["reference"]
                    cells = " | ".join(f"{1e3 * med[v]:.3f} ({ref / med[v]:.2f}x)" for v in variants)
                    print(f"| {name} {label} | {mode} | {1e3 * ref:.3f} | {cells} |", flush=True)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
