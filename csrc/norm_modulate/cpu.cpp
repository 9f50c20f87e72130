// norm_modulate: y = act(norm(x) * (1 + scale) + shift), forward and backward, for
//   tokens (B, T, D) with (B, D) modulation, rows (N, D) with (N, D) modulation (T = 1), and
//   GroupNorm (B, C, L) with (B, C) modulation and G groups of C / G contiguous channels.
// One read of x and one write of y forward; backward reads x and dy once more and writes dx,
// recomputing xhat from the saved mean/rstd instead of storing it.
#include "../common/cpu.h"

#define FLOWFM_CPU_KERNELS "../norm_modulate/cpu_kernels.h"
#include "../common/cpu_variants.h"

TORCH_LIBRARY_IMPL(flowfm, CPU, m) {
  m.impl("norm_modulate", FLOWFM_CPU_BY_CAPABILITY(norm_modulate_cpu));
  m.impl("norm_modulate_backward", FLOWFM_CPU_BY_CAPABILITY(norm_modulate_backward_cpu));
}
