// attention: O = softmax(Q K^T * scale) V per (batch, head), q / k / v (B, H, T, hd), no mask, scale
// 1 / sqrt(hd); the probabilities P (B, H, T, T) are returned for the backward. Forward and backward.
//
// Why ours: at the DiT's sequence lengths (T = 30 tokens, hd = 32) ATen's CPU flash-attention kernel
// spends its time in per-block setup: 0.88 ms forward and 2.4 ms forward + backward for (64, 4, 30,
// 32) on 2 cores, where the whole problem is 30 MFLOP. Here one task owns one head: its q, k, v (a
// few KB) sit in L1, every product accumulates in vector registers over its reduction index (K and V
// transposed once per head where that index must be contiguous), and P is kept (T^2 values per
// head) instead of recomputed.
// The Python op sends sequences longer than MAX_T (flowfm_fast/ops/attention.py) to the reference
// (P grows as T^2).
#include "../common/cpu.h"
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#define FLOWFM_CPU_KERNELS "../attention/cpu_kernels.h"
// AVX-512 CPUs run the avx2 kernels: 4-15 % faster at hd = 32 and even at hd = 64 on a Zen 5 EPYC
// (interleaved in one process), 1.2-1.6x faster on a Xeon (benchmarks/results/cpu-avx512-epyc-NOTES.md).
#define FLOWFM_CPU_AVX512_RUNS_AVX2
#include "../common/cpu_variants.h"

TORCH_LIBRARY_IMPL(flowfm, CPU, m) {
  m.impl("attention", FLOWFM_CPU_BY_CAPABILITY(attention_cpu));
  m.impl("attention_backward", FLOWFM_CPU_BY_CAPABILITY(attention_backward_cpu));
}
