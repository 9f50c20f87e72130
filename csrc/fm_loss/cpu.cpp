// fm_loss: loss = mean_b w_b * mean_i (v - u)^2 with u = x1 - (1 - s) x0, never materialising u.
// One pass reads v, x0, x1 once; with need_grad it also writes dv = 2 w_b (v - u) / (B N) in fp32
// (float64 for float64), the gradient of the loss for an upstream gradient of 1.
// Outputs: loss (scalar), per_sample (B,) = mean_i (v - u)^2 unweighted, dv (or an empty tensor).
// Per-sample sums use fixed chunks (common.h), so the loss does not depend on the thread count.
#include "../common/cpu.h"

#define FLOWFM_CPU_KERNELS "../fm_loss/cpu_kernels.h"
#include "../common/cpu_variants.h"

TORCH_LIBRARY_IMPL(flowfm, CPU, m) {
  m.impl("fm_loss", FLOWFM_CPU_BY_CAPABILITY(fm_loss_cpu));
}
