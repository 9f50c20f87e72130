// fm_loss: loss = mean_b w_b * mean_i (v - u)^2, u = x1 - (1 - s) x0, with dv written in the
// same pass (u is never stored).
// Pass 1: one block per chunk of a sample's row: squared-error partial sum, and dv = c_b (v - u)
//         with c_b = 2 w_b / (B n). Pass 2: one block sums each row's partials in chunk order into
//         per_sample (unweighted means, which the autograd formula of dweight needs), then
//         w_b * per_sample_b in a fixed tree into the loss.
// No float atomics anywhere, so the loss is bitwise reproducible for a given shape.
#include "../common/cuda_device.cuh"
#include "cuda.h"

namespace flowfm::cuda {
namespace {

template <typename V, typename X>
__global__ void loss_partial_kernel(const V* __restrict__ v, const X* __restrict__ x0, const X* __restrict__ x1,
                                    const Acc<X>* __restrict__ weight, Acc<X>* __restrict__ dv,
                                    Acc<X>* __restrict__ partial, int64_t n, int64_t chunks, Acc<X> one_minus_s,
                                    Acc<X> grad_scale) {
  using A = Acc<X>;
  const int64_t b = blockIdx.x / chunks, begin = (blockIdx.x % chunks) * kRowChunk;
  const int64_t end = begin + kRowChunk < n ? begin + kRowChunk : n;
  const A coef = weight ? weight[b] * grad_scale : grad_scale;
  A sq = A(0);
  for (int64_t i = b * n + begin + threadIdx.x; i < b * n + end; i += blockDim.x) {
    const A d = static_cast<A>(to_acc(v[i])) - (to_acc(x1[i]) - one_minus_s * to_acc(x0[i]));
    sq += d * d;
    if (dv) dv[i] = coef * d;
  }
  sq = block_sum(sq);
  if (threadIdx.x == 0) partial[blockIdx.x] = sq;
}

template <typename A>
__global__ void loss_finish_kernel(const A* __restrict__ partial, const A* __restrict__ weight,
                                   A* __restrict__ per_sample, A* __restrict__ loss, int64_t B, int64_t n,
                                   int64_t chunks) {
  A local = A(0);
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    A s = A(0);
    for (int64_t p = 0; p < chunks; ++p) s += partial[b * chunks + p];
    const A ps = s / static_cast<A>(n);
    per_sample[b] = ps;
    local += weight ? weight[b] * ps : ps;
  }
  local = block_sum(local);
  if (threadIdx.x == 0) *loss = local / static_cast<A>(B);
}

}  // namespace

template <typename V, typename X>
void fm_loss(const V* v, const X* x0, const X* x1, const Acc<X>* weight, Acc<X>* loss, Acc<X>* per_sample,
             Acc<X>* dv, Acc<X>* partial, int64_t B, int64_t n, double sigma_min, cudaStream_t stream) {
  using A = Acc<X>;
  if (B <= 0 || n <= 0) return;
  const int64_t chunks = row_chunks(n);
  const double grad_scale = 2.0 / (static_cast<double>(B) * static_cast<double>(n));
  loss_partial_kernel<V, X><<<static_cast<unsigned int>(B * chunks), kThreads, 0, stream>>>(
      v, x0, x1, weight, dv, partial, n, chunks, static_cast<A>(1.0 - sigma_min), static_cast<A>(grad_scale));
  // One block: B is a batch size, and a single block keeps the final sum order fixed.
  loss_finish_kernel<A><<<1, kThreads, 0, stream>>>(partial, weight, per_sample, loss, B, n, chunks);
}

#define FLOWFM_INSTANTIATE(V, X)                                                                           \
  template void fm_loss<V, X>(const V*, const X*, const X*, const Acc<X>*, Acc<X>*, Acc<X>*, Acc<X>*, Acc<X>*, \
                              int64_t, int64_t, double, cudaStream_t);
FLOWFM_INSTANTIATE(float, float)
FLOWFM_INSTANTIATE(double, double)
FLOWFM_INSTANTIATE(__half, __half)
FLOWFM_INSTANTIATE(__nv_bfloat16, __nv_bfloat16)
FLOWFM_INSTANTIATE(__half, float)
FLOWFM_INSTANTIATE(__nv_bfloat16, float)
#undef FLOWFM_INSTANTIATE

}  // namespace flowfm::cuda
