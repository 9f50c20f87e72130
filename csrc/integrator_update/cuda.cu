// Integrator updates, elementwise and memory-bound:
//   euler_step:  x += dt * v                      (in place)
//   rk_combine:  out = x + sum_i coef_i * k_i     (coef_i = dt * b_i, k_0 first)
// rk_combine reads all stages in one pass and rounds once, instead of one read-modify-write of
// out per stage. Stage pointers travel by value in a small struct (kernel parameter space), so no
// device-side pointer array is allocated or copied. No __restrict__: out may alias x or a stage.
#include "../common/cuda_device.cuh"
#include "cuda.h"

namespace flowfm::cuda {
namespace {

template <typename S, typename V>
__global__ void euler_step_kernel(S* x, const V* v, int64_t n, Acc<S> dt) {
  using A = Acc<S>;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    x[i] = from_acc<S>(to_acc(x[i]) + dt * static_cast<A>(to_acc(v[i])));
}

template <typename S> struct Stages {
  const S* k[kMaxStages];
  Acc<S> coef[kMaxStages];
  int count;
};

template <typename S>
__global__ void rk_combine_kernel(S* out, const S* x, Stages<S> stages, int64_t n) {
  using A = Acc<S>;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    A acc = to_acc(x[i]);
#pragma unroll
    for (int s = 0; s < kMaxStages; ++s)
      if (s < stages.count) acc += stages.coef[s] * static_cast<A>(to_acc(stages.k[s][i]));
    out[i] = from_acc<S>(acc);
  }
}

}  // namespace

template <typename S, typename V> void euler_step(S* x, const V* v, int64_t n, double dt, cudaStream_t stream) {
  if (n <= 0) return;
  euler_step_kernel<S, V><<<grid_for(n), kThreads, 0, stream>>>(x, v, n, static_cast<Acc<S>>(dt));
}

template <typename S>
void rk_combine(S* out, const S* x, const S* const* ks, const double* coefs, int num_stages, int64_t n,
                cudaStream_t stream) {
  if (n <= 0) return;
  // Batches of kMaxStages; after the first, the running result in out is the next pass's x.
  int first = 0;
  do {
    Stages<S> st{};
    st.count = num_stages - first < kMaxStages ? num_stages - first : kMaxStages;
    for (int s = 0; s < st.count; ++s) {
      st.k[s] = ks[first + s];
      st.coef[s] = static_cast<Acc<S>>(coefs[first + s]);
    }
    rk_combine_kernel<S><<<grid_for(n), kThreads, 0, stream>>>(out, first == 0 ? x : out, st, n);
    first += st.count;
  } while (first < num_stages);
}

#define FLOWFM_INSTANTIATE(S)                                                \
  template void euler_step<S, S>(S*, const S*, int64_t, double, cudaStream_t); \
  template void rk_combine<S>(S*, const S*, const S* const*, const double*, int, int64_t, cudaStream_t);
FLOWFM_INSTANTIATE(float)
FLOWFM_INSTANTIATE(double)
FLOWFM_INSTANTIATE(__half)
FLOWFM_INSTANTIATE(__nv_bfloat16)
#undef FLOWFM_INSTANTIATE
template void euler_step<__half, float>(__half*, const float*, int64_t, double, cudaStream_t);
template void euler_step<__nv_bfloat16, float>(__nv_bfloat16*, const float*, int64_t, double, cudaStream_t);

}  // namespace flowfm::cuda
