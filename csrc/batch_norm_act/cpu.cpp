// batch_norm_act: y = act((x - mean_c) * rstd_c * w_c + b_c) for x (B, C, L) (L = 1 for (B, C)),
// statistics per channel over B and L (training: the batch's; eval: the running ones passed in),
// act none or relu. Forward and backward.
//
// Why ours: ATen's CPU batch norm gathers training statistics with a per-element Welford update
// (a division per value): ~400 us for the encoder's (64, 32, 300) fp32 activations on this 2-core
// machine, where its ReLU alone takes ~35 us. Here each channel is reduced by one task in two
// vectorised passes (sum, then centred sum of squares) and normalised with the ReLU in one more:
// the result is the same for any thread count.
#include "../common/cpu.h"
#include <limits>
#include <tuple>
#include <utility>

#define FLOWFM_CPU_KERNELS "../batch_norm_act/cpu_kernels.h"
#include "../common/cpu_variants.h"

TORCH_LIBRARY_IMPL(flowfm, CPU, m) {
  m.impl("batch_norm_act", FLOWFM_CPU_BY_CAPABILITY(batch_norm_act_cpu));
  m.impl("batch_norm_act_backward", FLOWFM_CPU_BY_CAPABILITY(batch_norm_act_backward_cpu));
}
