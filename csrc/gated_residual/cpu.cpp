// gated_residual: y = res + gate[b] * h, gate (B, D) broadcast over T (rows (N, D): T = 1).
// Forward is one pass over res and h; backward writes dh = dy * gate and dgate[b] = sum_t dy * h
// with each b owned by one task, so results do not depend on the thread count.
#include "../common/cpu.h"

#define FLOWFM_CPU_KERNELS "../gated_residual/cpu_kernels.h"
#include "../common/cpu_variants.h"

TORCH_LIBRARY_IMPL(flowfm, CPU, m) {
  m.impl("gated_residual", FLOWFM_CPU_BY_CAPABILITY(gated_residual_cpu));
  m.impl("gated_residual_backward", FLOWFM_CPU_BY_CAPABILITY(gated_residual_backward_cpu));
  m.impl("gated_residual_norm_modulate", FLOWFM_CPU_BY_CAPABILITY(fused_cpu));
  m.impl("gated_residual_norm_modulate_backward", FLOWFM_CPU_BY_CAPABILITY(fused_backward_cpu));
}
