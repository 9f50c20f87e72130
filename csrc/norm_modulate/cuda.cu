// norm_modulate: y = act((xhat * w + bias) * (1 + scale_b) + shift_b), forward and backward.
//   tokens: x (B, T, D), statistics over D per row, modulation (B, D) broadcast over T;
//   group:  x (B, C, L), statistics over each group of C / G channels times L, modulation (B, C).
// Statistics are two-pass (mean, then squared deviations) in fp32 (double for double): x is re-read
// from L1/L2 rather than risking E[x^2] - E[x]^2 cancellation. Backward recomputes xhat from the
// saved mean/rstd instead of storing it.
//
// Layout of the work:
// - token rows: one warp per row (D is a model width, tens to a few thousand), so row sums are
//   warp shuffles and no shared memory or block barrier is needed;
// - token parameter gradients: one thread per feature d and sample segment, looping over the
//   segment's rows; dshift/dscale are complete per sample, dweight/dbias partials per segment are
//   summed in segment order by a last kernel (no atomics: deterministic);
// - groups: one block per (sample, group); in backward each warp takes whole channels so the
//   per-channel sums (dshift, dscale, partials) need no atomics either.
#include "../common/cuda_device.cuh"
#include "cuda.h"

namespace flowfm::cuda {
namespace {

constexpr int kWarpsPerBlock = kThreads / kWarp;

template <typename A> struct ModAt {
  // The modulation and affine of feature i of sample b, with the defaults of absent tensors.
  Modulation<A> m;
  __device__ __forceinline__ A shift(int64_t b, int64_t F, int64_t i) const { return m.shift ? m.shift[b * F + i] : A(0); }
  __device__ __forceinline__ A one_plus_scale(int64_t b, int64_t F, int64_t i) const {
    return A(1) + (m.scale ? m.scale[b * F + i] : A(0));
  }
  __device__ __forceinline__ A w(int64_t i) const { return m.weight ? m.weight[i] : A(1); }
  __device__ __forceinline__ A bias(int64_t i) const { return m.bias ? m.bias[i] : A(0); }
};

// ------------------------------------------------------------------------------ tokens

template <typename S, Act ACT>
__global__ void token_forward_kernel(const S* __restrict__ x, S* __restrict__ y, Acc<S>* __restrict__ mean,
                                     Acc<S>* __restrict__ rstd, int64_t rows, int64_t T, int64_t D, bool rms,
                                     Acc<S> eps, Modulation<Acc<S>> mod) {
  using A = Acc<S>;
  const ModAt<A> p{mod};
  const int lane = threadIdx.x % kWarp;
  const int64_t first = blockIdx.x * (int64_t)kWarpsPerBlock + threadIdx.x / kWarp;
  for (int64_t row = first; row < rows; row += (int64_t)gridDim.x * kWarpsPerBlock) {
    const S* xr = x + row * D;
    A mu = A(0);
    if (!rms) {
      A s = A(0);
      for (int64_t i = lane; i < D; i += kWarp) s += to_acc(xr[i]);
      mu = warp_sum(s) / static_cast<A>(D);
    }
    A var = A(0);
    for (int64_t i = lane; i < D; i += kWarp) {
      const A c = to_acc(xr[i]) - mu;
      var += c * c;
    }
    const A r = rsqrt_(warp_sum(var) / static_cast<A>(D) + eps);
    if (lane == 0) {
      mean[row] = mu;
      rstd[row] = r;
    }
    const int64_t b = row / T;
    for (int64_t i = lane; i < D; i += kWarp) {
      const A a = (to_acc(xr[i]) - mu) * r * p.w(i) + p.bias(i);
      y[row * D + i] = from_acc<S>(act_fwd<ACT>(a * p.one_plus_scale(b, D, i) + p.shift(b, D, i)));
    }
  }
}

// dx of one row per warp: dxhat = gu (1 + scale) w, dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)).
template <typename S, Act ACT>
__global__ void token_backward_dx_kernel(const S* __restrict__ dy, const S* __restrict__ x,
                                         const Acc<S>* __restrict__ mean, const Acc<S>* __restrict__ rstd,
                                         S* __restrict__ dx, int64_t rows, int64_t T, int64_t D, bool rms,
                                         Modulation<Acc<S>> mod) {
  using A = Acc<S>;
  const ModAt<A> p{mod};
  const int lane = threadIdx.x % kWarp;
  const int64_t first = blockIdx.x * (int64_t)kWarpsPerBlock + threadIdx.x / kWarp;
  for (int64_t row = first; row < rows; row += (int64_t)gridDim.x * kWarpsPerBlock) {
    const int64_t b = row / T, o = row * D;
    const A mu = mean[row], r = rstd[row];
    auto dxhat_at = [&](int64_t i, A& xhat) {
      xhat = (to_acc(x[o + i]) - mu) * r;
      const A one_plus = p.one_plus_scale(b, D, i);
      A gu = to_acc(dy[o + i]);
      if constexpr (ACT != Act::None) gu *= act_grad<ACT>((xhat * p.w(i) + p.bias(i)) * one_plus + p.shift(b, D, i));
      return gu * one_plus * p.w(i);
    };
    A s1 = A(0), s2 = A(0);
    for (int64_t i = lane; i < D; i += kWarp) {
      A xhat;
      const A g = dxhat_at(i, xhat);
      s1 += g;
      s2 += g * xhat;
    }
    const A c1 = rms ? A(0) : warp_sum(s1) / static_cast<A>(D);
    const A c2 = warp_sum(s2) / static_cast<A>(D);
    for (int64_t i = lane; i < D; i += kWarp) {
      A xhat;
      const A g = dxhat_at(i, xhat);
      dx[o + i] = from_acc<S>(r * (g - c1 - xhat * c2));
    }
  }
}

// Parameter gradients: thread (segment, d). Samples [b0, b1) of the segment, all T rows each.
template <typename S, Act ACT>
__global__ void token_backward_params_kernel(const S* __restrict__ dy, const S* __restrict__ x,
                                             const Acc<S>* __restrict__ mean, const Acc<S>* __restrict__ rstd,
                                             int64_t B, int64_t T, int64_t D, int64_t segments, int64_t d_blocks,
                                             Modulation<Acc<S>> mod, ModulationGrads<Acc<S>> g,
                                             Acc<S>* __restrict__ dw_part, Acc<S>* __restrict__ db_part) {
  using A = Acc<S>;
  const ModAt<A> p{mod};
  const int64_t seg = blockIdx.x / d_blocks;
  const int64_t d = (blockIdx.x % d_blocks) * blockDim.x + threadIdx.x;
  if (d >= D) return;
  const int64_t b0 = seg * B / segments, b1 = (seg + 1) * B / segments;
  const A w = p.w(d), bi = p.bias(d);
  A dw = A(0), db = A(0);
  for (int64_t b = b0; b < b1; ++b) {
    const A one_plus = p.one_plus_scale(b, D, d), sh = p.shift(b, D, d);
    A dsh = A(0), dsc = A(0);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t row = b * T + t;
      const A xhat = (to_acc(x[row * D + d]) - mean[row]) * rstd[row];
      const A a = xhat * w + bi;
      A gu = to_acc(dy[row * D + d]);
      if constexpr (ACT != Act::None) gu *= act_grad<ACT>(a * one_plus + sh);
      dsh += gu;
      dsc += gu * a;
      dw += gu * one_plus * xhat;
      db += gu * one_plus;
    }
    if (g.dshift) g.dshift[b * D + d] = dsh;
    if (g.dscale) g.dscale[b * D + d] = dsc;
  }
  if (dw_part) dw_part[seg * D + d] = dw;
  if (db_part) db_part[seg * D + d] = db;
}

// out[f] = sum_r part[r, f], r in order.
template <typename A>
__global__ void sum_partials_kernel(const A* __restrict__ part, int64_t R, int64_t F, A* __restrict__ out) {
  for (int64_t f = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; f < F; f += (int64_t)gridDim.x * blockDim.x) {
    A s = A(0);
    for (int64_t r = 0; r < R; ++r) s += part[r * F + f];
    out[f] = s;
  }
}

// ------------------------------------------------------------------------------ GroupNorm

// One block per (b, g): the group's n = Cg * L elements are contiguous.
template <typename S, Act ACT>
__global__ void group_forward_kernel(const S* __restrict__ x, S* __restrict__ y, Acc<S>* __restrict__ mean,
                                     Acc<S>* __restrict__ rstd, int64_t C, int64_t L, int64_t G, Acc<S> eps,
                                     Modulation<Acc<S>> mod) {
  using A = Acc<S>;
  const ModAt<A> p{mod};
  const int64_t bg = blockIdx.x, b = bg / G, Cg = C / G, n = Cg * L;
  const S* xg = x + bg * n;
  A s = A(0);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += to_acc(xg[i]);
  const A mu = block_sum(s) / static_cast<A>(n);
  A var = A(0);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const A c = to_acc(xg[i]) - mu;
    var += c * c;
  }
  const A r = rsqrt_(block_sum(var) / static_cast<A>(n) + eps);
  if (threadIdx.x == 0) {
    mean[bg] = mu;
    rstd[bg] = r;
  }
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int64_t c = (bg % G) * Cg + i / L;
    const A one_plus = p.one_plus_scale(b, C, c);
    // u = x * alpha + beta folds normalisation, affine and modulation into one FMA.
    const A alpha = r * p.w(c) * one_plus;
    const A beta = (p.bias(c) - mu * r * p.w(c)) * one_plus + p.shift(b, C, c);
    y[bg * n + i] = from_acc<S>(act_fwd<ACT>(to_acc(xg[i]) * alpha + beta));
  }
}

// One block per (b, g); warp w owns channels w, w + 8, ... of the group: it sums gu and gu * xhat
// over L for each, writing dshift/dscale and the per-sample dweight/dbias partials directly.
template <typename S, Act ACT>
__global__ void group_backward_kernel(const S* __restrict__ dy, const S* __restrict__ x,
                                      const Acc<S>* __restrict__ mean, const Acc<S>* __restrict__ rstd,
                                      S* __restrict__ dx, int64_t C, int64_t L, int64_t G, Modulation<Acc<S>> mod,
                                      ModulationGrads<Acc<S>> g, Acc<S>* __restrict__ dw_part,
                                      Acc<S>* __restrict__ db_part) {
  using A = Acc<S>;
  const ModAt<A> p{mod};
  const int64_t bg = blockIdx.x, b = bg / G, Cg = C / G, n = Cg * L, c0 = (bg % G) * Cg;
  const A mu = mean[bg], r = rstd[bg];
  const S* xg = x + bg * n;
  const S* dyg = dy + bg * n;
  auto gu_at = [&](int64_t i, int64_t c, A& xhat) {
    xhat = (to_acc(xg[i]) - mu) * r;
    A gu = to_acc(dyg[i]);
    if constexpr (ACT != Act::None)
      gu *= act_grad<ACT>((xhat * p.w(c) + p.bias(c)) * p.one_plus_scale(b, C, c) + p.shift(b, C, c));
    return gu;
  };
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  A sum1 = A(0), sum2 = A(0);  // this warp's share of sum dxhat, sum dxhat * xhat over the group
  for (int64_t cl = warp; cl < Cg; cl += blockDim.x / kWarp) {
    const int64_t c = c0 + cl;
    A s_g = A(0), s_gx = A(0);
    for (int64_t l = lane; l < L; l += kWarp) {
      A xhat;
      const A gu = gu_at(cl * L + l, c, xhat);
      s_g += gu;
      s_gx += gu * xhat;
    }
    s_g = warp_sum(s_g);
    s_gx = warp_sum(s_gx);
    const A one_plus = p.one_plus_scale(b, C, c);
    if (lane == 0) {
      if (g.dshift) g.dshift[b * C + c] = s_g;
      if (g.dscale) g.dscale[b * C + c] = p.w(c) * s_gx + p.bias(c) * s_g;
      if (dw_part) dw_part[b * C + c] = one_plus * s_gx;
      if (db_part) db_part[b * C + c] = one_plus * s_g;
    }
    sum1 += one_plus * p.w(c) * s_g;
    sum2 += one_plus * p.w(c) * s_gx;
  }
  // Every lane of a warp holds the same sums; count each warp once.
  const A c1 = block_sum(lane == 0 ? sum1 : A(0)) / static_cast<A>(n);
  const A c2 = block_sum(lane == 0 ? sum2 : A(0)) / static_cast<A>(n);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int64_t c = c0 + i / L;
    A xhat;
    const A gu = gu_at(i, c, xhat);
    dx[bg * n + i] = from_acc<S>(r * (gu * p.one_plus_scale(b, C, c) * p.w(c) - c1 - xhat * c2));
  }
}

// ------------------------------------------------------------------------------ dispatch

// Kernels are instantiated per activation, so the elementwise loops carry no act branch.
// (A macro rather than a templated lambda: the .cu files stay C++17.)
#define FLOWFM_DISPATCH_ACT(act, ...)                                              \
  switch (act) {                                                                   \
    case Act::Silu: { constexpr Act ACT = Act::Silu; __VA_ARGS__ } break;          \
    case Act::GeluTanh: { constexpr Act ACT = Act::GeluTanh; __VA_ARGS__ } break;  \
    default: { constexpr Act ACT = Act::None; __VA_ARGS__ } break;                 \
  }

unsigned int row_blocks(int64_t rows) {
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return static_cast<unsigned int>(blocks < 65536 ? blocks : 65536);
}

}  // namespace

template <typename S>
void norm_modulate_tokens_forward(const S* x, S* y, Acc<S>* mean, Acc<S>* rstd, int64_t B, int64_t T, int64_t D,
                                  bool rms, double eps, Act act, Modulation<Acc<S>> mod, cudaStream_t stream) {
  const int64_t rows = B * T;
  if (rows <= 0 || D <= 0) return;
  FLOWFM_DISPATCH_ACT(act,
    token_forward_kernel<S, ACT><<<row_blocks(rows), kThreads, 0, stream>>>(x, y, mean, rstd, rows, T, D, rms,
                                                                           static_cast<Acc<S>>(eps), mod);
  )
}

template <typename S>
void norm_modulate_group_forward(const S* x, S* y, Acc<S>* mean, Acc<S>* rstd, int64_t B, int64_t C, int64_t L,
                                 int64_t G, double eps, Act act, Modulation<Acc<S>> mod, cudaStream_t stream) {
  if (B <= 0 || C <= 0 || L <= 0) return;
  FLOWFM_DISPATCH_ACT(act,
    group_forward_kernel<S, ACT><<<static_cast<unsigned int>(B * G), kThreads, 0, stream>>>(
        x, y, mean, rstd, C, L, G, static_cast<Acc<S>>(eps), mod);
  )
}

template <typename S>
void norm_modulate_tokens_backward(const S* dy, const S* x, const Acc<S>* mean, const Acc<S>* rstd, S* dx,
                                   int64_t B, int64_t T, int64_t D, bool rms, Act act, Modulation<Acc<S>> mod,
                                   ModulationGrads<Acc<S>> grads, Acc<S>* dw_part, Acc<S>* db_part,
                                   cudaStream_t stream) {
  using A = Acc<S>;
  const int64_t rows = B * T;
  if (rows <= 0 || D <= 0) return;
  A* dwp = grads.dweight ? dw_part : nullptr;
  A* dbp = grads.dbias ? db_part : nullptr;
  const bool params = grads.dshift || grads.dscale || dwp || dbp;
  const int64_t segments = norm_modulate_partials(false, B);
  const int64_t d_blocks = (D + kThreads - 1) / kThreads;
  FLOWFM_DISPATCH_ACT(act,
    token_backward_dx_kernel<S, ACT><<<row_blocks(rows), kThreads, 0, stream>>>(dy, x, mean, rstd, dx, rows, T, D,
                                                                               rms, mod);
    if (params)
      token_backward_params_kernel<S, ACT><<<static_cast<unsigned int>(segments * d_blocks), kThreads, 0, stream>>>(
          dy, x, mean, rstd, B, T, D, segments, d_blocks, mod, grads, dwp, dbp);
  )
  if (dwp) sum_partials_kernel<A><<<grid_for(D), kThreads, 0, stream>>>(dwp, segments, D, grads.dweight);
  if (dbp) sum_partials_kernel<A><<<grid_for(D), kThreads, 0, stream>>>(dbp, segments, D, grads.dbias);
}

template <typename S>
void norm_modulate_group_backward(const S* dy, const S* x, const Acc<S>* mean, const Acc<S>* rstd, S* dx,
                                  int64_t B, int64_t C, int64_t L, int64_t G, Act act, Modulation<Acc<S>> mod,
                                  ModulationGrads<Acc<S>> grads, Acc<S>* dw_part, Acc<S>* db_part,
                                  cudaStream_t stream) {
  using A = Acc<S>;
  if (B <= 0 || C <= 0 || L <= 0) return;
  A* dwp = grads.dweight ? dw_part : nullptr;
  A* dbp = grads.dbias ? db_part : nullptr;
  FLOWFM_DISPATCH_ACT(act,
    group_backward_kernel<S, ACT><<<static_cast<unsigned int>(B * G), kThreads, 0, stream>>>(
        dy, x, mean, rstd, dx, C, L, G, mod, grads, dwp, dbp);
  )
  if (dwp) sum_partials_kernel<A><<<grid_for(C), kThreads, 0, stream>>>(dwp, B, C, grads.dweight);
  if (dbp) sum_partials_kernel<A><<<grid_for(C), kThreads, 0, stream>>>(dbp, B, C, grads.dbias);
}

#define FLOWFM_INSTANTIATE(S)                                                                                      \
  template void norm_modulate_tokens_forward<S>(const S*, S*, Acc<S>*, Acc<S>*, int64_t, int64_t, int64_t, bool,   \
                                                double, Act, Modulation<Acc<S>>, cudaStream_t);                    \
  template void norm_modulate_group_forward<S>(const S*, S*, Acc<S>*, Acc<S>*, int64_t, int64_t, int64_t, int64_t, \
                                               double, Act, Modulation<Acc<S>>, cudaStream_t);                     \
  template void norm_modulate_tokens_backward<S>(const S*, const S*, const Acc<S>*, const Acc<S>*, S*, int64_t,    \
                                                 int64_t, int64_t, bool, Act, Modulation<Acc<S>>,                  \
                                                 ModulationGrads<Acc<S>>, Acc<S>*, Acc<S>*, cudaStream_t);         \
  template void norm_modulate_group_backward<S>(const S*, const S*, const Acc<S>*, const Acc<S>*, S*, int64_t,     \
                                                int64_t, int64_t, int64_t, Act, Modulation<Acc<S>>,                \
                                                ModulationGrads<Acc<S>>, Acc<S>*, Acc<S>*, cudaStream_t);
FLOWFM_INSTANTIATE(float)
FLOWFM_INSTANTIATE(double)
FLOWFM_INSTANTIATE(__half)
FLOWFM_INSTANTIATE(__nv_bfloat16)
#undef FLOWFM_INSTANTIATE
#undef FLOWFM_DISPATCH_ACT

}  // namespace flowfm::cuda
