// Integrator updates, in place and allocation-free on contiguous tensors:
//   euler_step_:  x += dt * v
//   rk_combine:   out = x + dt * sum_i b_i k_i   (out may be x; terms with b_i = 0 are skipped;
//                 summation order is k_0 first, as in the reference)
// Arithmetic in fp32 (float64 for float64) with one rounding to the storage dtype at the end.
// A non-contiguous destination is computed into a contiguous buffer and copied back.
#include "../common/cpu.h"
#include <vector>

#define FLOWFM_CPU_KERNELS "../integrator_update/cpu_kernels.h"
#include "../common/cpu_variants.h"

TORCH_LIBRARY_IMPL(flowfm, CPU, m) {
  m.impl("euler_step_", FLOWFM_CPU_BY_CAPABILITY(euler_step_cpu));
  m.impl("rk_combine", FLOWFM_CPU_BY_CAPABILITY(rk_combine_cpu));
}
