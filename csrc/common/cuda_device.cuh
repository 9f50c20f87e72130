// Device helpers shared by the kernels in csrc/cuda: loads/stores in any storage type, warp and
// block sums in a fixed order, activations. CUDA headers only.
//
// Conversions are explicit intrinsics (never implicit __half/__nv_bfloat16 operators) so the files
// also compile under torch's -D__CUDA_NO_HALF_OPERATORS__ / -D__CUDA_NO_BFLOAT16_CONVERSIONS__.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_launch.h"

namespace flowfm::cuda {

constexpr int kWarp = 32;
constexpr int kThreads = 256;  // every block is a multiple of a warp (block_sum relies on it)

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename S> __device__ __forceinline__ S from_acc(Acc<S> v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float exp_(float v) { return expf(v); }
__device__ __forceinline__ double exp_(double v) { return exp(v); }
__device__ __forceinline__ float tanh_(float v) { return tanhf(v); }
__device__ __forceinline__ double tanh_(double v) { return tanh(v); }
__device__ __forceinline__ float rsqrt_(float v) { return rsqrtf(v); }
__device__ __forceinline__ double rsqrt_(double v) { return rsqrt(v); }

// Butterfly sum: lane i and lane i^k add the same two values (a + b == b + a exactly), so every
// lane ends with the bitwise-identical total.
template <typename A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block, returned to every thread. Fixed order (warp sums, then warp 0 over them),
// hence deterministic. Every thread of the block must call it.
template <typename A> __device__ A block_sum(A v) {
  __shared__ A warp_totals[kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int num_warps = blockDim.x / kWarp;
  v = warp_sum(v);
  __syncthreads();  // warp_totals may still be read by a previous call
  if (lane == 0) warp_totals[warp] = v;
  __syncthreads();
  A total = lane < num_warps ? warp_totals[lane] : A(0);
  total = warp_sum(total);  // every warp redoes warp 0's sum: no third barrier needed
  return total;
}

// act(u) and d act / du, with the constants of torch's gelu(approximate="tanh").
template <Act ACT, typename A> __device__ __forceinline__ A act_fwd(A u) {
  if constexpr (ACT == Act::Silu) {
    return u / (A(1) + exp_(-u));
  } else if constexpr (ACT == Act::GeluTanh) {
    const A k = A(0.7978845608028654), c = A(0.044715);
    return A(0.5) * u * (A(1) + tanh_(k * (u + c * u * u * u)));
  } else {
    return u;
  }
}

template <Act ACT, typename A> __device__ __forceinline__ A act_grad(A u) {
  if constexpr (ACT == Act::Silu) {
    const A s = A(1) / (A(1) + exp_(-u));
    return s * (A(1) + u * (A(1) - s));
  } else if constexpr (ACT == Act::GeluTanh) {
    const A k = A(0.7978845608028654), c = A(0.044715);
    const A th = tanh_(k * (u + c * u * u * u));
    return A(0.5) * (A(1) + th) + A(0.5) * u * (A(1) - th * th) * k * (A(1) + A(3) * c * u * u);
  } else {
    return A(1);
  }
}

// Grid for a grid-stride loop over n elements: enough blocks to fill any current GPU, capped so
// huge tensors loop instead of launching millions of blocks.
inline unsigned int grid_for(int64_t n, int threads = kThreads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned int>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

}  // namespace flowfm::cuda
