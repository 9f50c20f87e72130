// Host launchers of the integrator updates (euler_step_, rk_combine), defined in cuda.cu beside this file, under the
// contract in common/cuda_launch.h. CUDA headers only.
#pragma once
#include "../common/cuda_launch.h"

namespace flowfm::cuda {

// x += dt * v in place (v may alias x). V is S, or Acc<S> for a v of another dtype (promoted
// exactly by the caller rather than rounded to x's dtype).
template <typename S, typename V> void euler_step(S* x, const V* v, int64_t n, double dt, cudaStream_t stream);

// out = x + sum_i coef_i * k_i, accumulated in Acc<S> in stage order (k_0 first) and rounded
// once; coef_i = dt * b_i is formed by the caller in double. out may alias x or any k_i. Any
// number of stages: more than kMaxStages run as several passes (rounding once per pass).
constexpr int kMaxStages = 8;
template <typename S>
void rk_combine(S* out, const S* x, const S* const* ks, const double* coefs, int num_stages, int64_t n,
                cudaStream_t stream);

}  // namespace flowfm::cuda
