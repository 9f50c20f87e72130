// fm_interpolate: x_t = (1 - (1 - s) t_b) x0 + t_b x1 and u_t = x1 - (1 - s) x0, one pass that
// reads x0 and x1 once and writes both outputs. Backward:
//   dx0 = (1 - (1 - s) t_b) dx_t - (1 - s) du_t,   dx1 = t_b dx_t + du_t,
//   dt_b = sum over the sample of dx_t * (x1 - (1 - s) x0)     (fixed-chunk sums: thread-count independent).
#include "../common/cpu.h"

#define FLOWFM_CPU_KERNELS "../fm_interpolate/cpu_kernels.h"
#include "../common/cpu_variants.h"

TORCH_LIBRARY_IMPL(flowfm, CPU, m) {
  m.impl("fm_interpolate", FLOWFM_CPU_BY_CAPABILITY(fm_interpolate_cpu));
  m.impl("fm_interpolate_backward", FLOWFM_CPU_BY_CAPABILITY(fm_interpolate_backward_cpu));
}
