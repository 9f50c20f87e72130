// fm_interpolate: the flow-matching path in one pass, and its backward.
//   x_t = a_b x0 + t_b x1,  u_t = x1 - (1 - s) x0,  a_b = 1 - (1 - s) t_b
// A block owns one chunk of one sample's row (row_chunks(n) chunks per row), so t_b is read once
// per block and the backward's dt_b = sum_i dx_t (x1 - (1 - s) x0) gets a per-chunk partial
// without atomics; a second tiny kernel sums each row's partials in chunk order.
#include "../common/cuda_device.cuh"
#include "cuda.h"

namespace flowfm::cuda {
namespace {

template <typename S>
__global__ void interpolate_forward_kernel(const S* __restrict__ x0, const S* __restrict__ x1,
                                           const Acc<S>* __restrict__ t, S* __restrict__ x_t,
                                           S* __restrict__ u_t, int64_t n, int64_t chunks, Acc<S> one_minus_s) {
  using A = Acc<S>;
  const int64_t b = blockIdx.x / chunks, begin = (blockIdx.x % chunks) * kRowChunk;
  const int64_t end = begin + kRowChunk < n ? begin + kRowChunk : n;
  const A tb = t[b], a = A(1) - one_minus_s * tb;
  for (int64_t i = b * n + begin + threadIdx.x; i < b * n + end; i += blockDim.x) {
    const A v0 = to_acc(x0[i]), v1 = to_acc(x1[i]);
    x_t[i] = from_acc<S>(a * v0 + tb * v1);
    u_t[i] = from_acc<S>(v1 - one_minus_s * v0);
  }
}

template <typename S>
__global__ void interpolate_backward_kernel(const S* __restrict__ dx_t, const S* __restrict__ du_t,
                                            const S* __restrict__ x0, const S* __restrict__ x1,
                                            const Acc<S>* __restrict__ t, S* __restrict__ dx0, S* __restrict__ dx1,
                                            Acc<S>* __restrict__ partial, int64_t n, int64_t chunks,
                                            Acc<S> one_minus_s) {
  using A = Acc<S>;
  const int64_t b = blockIdx.x / chunks, begin = (blockIdx.x % chunks) * kRowChunk;
  const int64_t end = begin + kRowChunk < n ? begin + kRowChunk : n;
  const A tb = t[b], a = A(1) - one_minus_s * tb;
  A dt_sum = A(0);
  for (int64_t i = b * n + begin + threadIdx.x; i < b * n + end; i += blockDim.x) {
    const A g_x = dx_t ? to_acc(dx_t[i]) : A(0);
    const A g_u = du_t ? to_acc(du_t[i]) : A(0);
    const A v0 = to_acc(x0[i]), v1 = to_acc(x1[i]);
    dx0[i] = from_acc<S>(a * g_x - one_minus_s * g_u);
    dx1[i] = from_acc<S>(tb * g_x + g_u);
    dt_sum += g_x * (v1 - one_minus_s * v0);
  }
  dt_sum = block_sum(dt_sum);
  if (threadIdx.x == 0) partial[blockIdx.x] = dt_sum;
}

template <typename A>
__global__ void sum_row_partials_kernel(const A* __restrict__ partial, A* __restrict__ out, int64_t B,
                                        int64_t chunks) {
  for (int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; b < B; b += (int64_t)gridDim.x * blockDim.x) {
    A s = A(0);
    for (int64_t p = 0; p < chunks; ++p) s += partial[b * chunks + p];
    out[b] = s;
  }
}

}  // namespace

template <typename S>
void fm_interpolate_forward(const S* x0, const S* x1, const Acc<S>* t, S* x_t, S* u_t, int64_t B, int64_t n,
                            double sigma_min, cudaStream_t stream) {
  if (B <= 0 || n <= 0) return;
  const int64_t chunks = row_chunks(n);
  interpolate_forward_kernel<S><<<static_cast<unsigned int>(B * chunks), kThreads, 0, stream>>>(
      x0, x1, t, x_t, u_t, n, chunks, static_cast<Acc<S>>(1.0 - sigma_min));
}

template <typename S>
void fm_interpolate_backward(const S* dx_t, const S* du_t, const S* x0, const S* x1, const Acc<S>* t, S* dx0,
                             S* dx1, Acc<S>* dt, Acc<S>* partial, int64_t B, int64_t n, double sigma_min,
                             cudaStream_t stream) {
  if (B <= 0 || n <= 0) return;
  const int64_t chunks = row_chunks(n);
  interpolate_backward_kernel<S><<<static_cast<unsigned int>(B * chunks), kThreads, 0, stream>>>(
      dx_t, du_t, x0, x1, t, dx0, dx1, partial, n, chunks, static_cast<Acc<S>>(1.0 - sigma_min));
  sum_row_partials_kernel<Acc<S>><<<grid_for(B), kThreads, 0, stream>>>(partial, dt, B, chunks);
}

#define FLOWFM_INSTANTIATE(S)                                                                                  \
  template void fm_interpolate_forward<S>(const S*, const S*, const Acc<S>*, S*, S*, int64_t, int64_t, double, \
                                          cudaStream_t);                                                       \
  template void fm_interpolate_backward<S>(const S*, const S*, const S*, const S*, const Acc<S>*, S*, S*,      \
                                           Acc<S>*, Acc<S>*, int64_t, int64_t, double, cudaStream_t);
FLOWFM_INSTANTIATE(float)
FLOWFM_INSTANTIATE(double)
FLOWFM_INSTANTIATE(__half)
FLOWFM_INSTANTIATE(__nv_bfloat16)
#undef FLOWFM_INSTANTIATE

}  // namespace flowfm::cuda
