// timestep_embedding: emb[n] = [cos(t_n f_k), sin(t_n f_k)], f_k = max_period^(-k / half),
// k < half = dim / 2 (an odd dim gets one zero column). Output fp32.
// Forward: the reference's fp32 arithmetic, fused into one output (no cat). Backward (rarely
// needed: t is data, not a parameter) evaluates in float64: dt_n = sum_k f_k (cos(a) * demb_sin - sin(a) * demb_cos).
#include "../common/cpu.h"
#include <vector>

#define FLOWFM_CPU_KERNELS "../timestep_embedding/cpu_kernels.h"
#include "../common/cpu_variants.h"

TORCH_LIBRARY_IMPL(flowfm, CPU, m) {
  m.impl("timestep_embedding", FLOWFM_CPU_BY_CAPABILITY(timestep_embedding_cpu));
  m.impl("timestep_embedding_backward", FLOWFM_CPU_BY_CAPABILITY(timestep_embedding_backward_cpu));
}
