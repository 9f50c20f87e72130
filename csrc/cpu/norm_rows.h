// Row kernels of the token norms (LayerNorm / RMSNorm over D) with the adaLN modulation and
// activation, shared by norm_modulate and the fused gated_residual_norm_modulate.
//
//   xhat = (x - mean) * rstd          (rms: mean = 0)
//   a    = xhat * w + bias            (the norm's own affine; ones / zeros when absent)
//   u    = a * (1 + scale_b) + shift_b
//   y    = act(u)
//
// A row arrives as fp32 (or float64) values in a scratch buffer, so the caller decides where x
// comes from (a plain load, or the just-computed residual res + gate * h).
#pragma once
#include <vector>

#include "common.h"

namespace flowfm::cpu {

// Per-sample modulation and per-feature affine, already in the accumulation dtype.
template <typename A> struct RowParams {
  const A* shift;  // (D,) for this sample
  const A* scale;
  const A* w;      // (D,)
  const A* bias;
};

// Ones / zeros standing in for absent optional tensors keep every inner loop branch-free.
template <typename A> struct Defaults {
  std::vector<A> ones, zeros;
  explicit Defaults(int64_t n) : ones(n, A(1)), zeros(n, A(0)) {}
  const A* or_ones(const A* p) const { return p ? p : ones.data(); }
  const A* or_zeros(const A* p) const { return p ? p : zeros.data(); }
};

// Row statistics; x is read as X (the storage dtype or an fp32 scratch row).
template <typename A, typename X>
inline void row_stats(const X* __restrict x, int64_t D, bool rms, A eps, A& mean, A& rstd) {
  A m = A(0);
  if (!rms) {
#pragma omp simd reduction(+ : m)
    for (int64_t i = 0; i < D; ++i) m += static_cast<A>(x[i]);
    m /= A(D);
  }
  A v = A(0);
#pragma omp simd reduction(+ : v)
  for (int64_t i = 0; i < D; ++i) {
    const A c = static_cast<A>(x[i]) - m;
    v += c * c;
  }
  mean = m;
  rstd = A(1) / std::sqrt(v / A(D) + eps);
}

template <Act ACT, typename A, typename X, typename S>
inline void row_forward(const X* __restrict x, S* __restrict y, int64_t D, A mean, A rstd, const RowParams<A>& p) {
  const A* __restrict w = p.w;
  const A* __restrict bias = p.bias;
  const A* __restrict scale = p.scale;
  const A* __restrict shift = p.shift;
#pragma omp simd
  for (int64_t i = 0; i < D; ++i) {
    const A a = (static_cast<A>(x[i]) - mean) * rstd * w[i] + bias[i];
    y[i] = to_storage<S>(act_fwd<A>(ACT, a * (A(1) + scale[i]) + shift[i]));
  }
}

// Per-sample sums over the rows of one sample: s0 = sum_t gu, s1 = sum_t gu * xhat, with
// gu = dL/du. Every parameter gradient follows from them once per sample (finish_sample), so the
// per-element loop updates two accumulators instead of four (dshift, dscale, dw, db).
template <typename A> struct RowSums {
  A* s0;
  A* s1;
};

// dx of one row given dy, accumulating s0/s1. x is read as X (the storage dtype, or an fp32
// scratch row), dx written as DX; dxhat waits in an fp32 scratch row (L1-resident) between the
// two passes. Pointers are restrict-qualified arguments so the loops vectorise with plain loads
// and stores.
template <Act ACT, typename A, typename X, typename S, typename DX>
inline void row_backward(const X* __restrict x, const S* __restrict dy, A* __restrict scratch, DX* __restrict dx,
                         int64_t D, bool rms, A mean, A rstd, const RowParams<A>& p, const RowSums<A>& g) {
  const A* __restrict w = p.w;
  const A* __restrict bias = p.bias;
  const A* __restrict scale = p.scale;
  const A* __restrict shift = p.shift;
  A* __restrict s0 = g.s0;
  A* __restrict s1 = g.s1;
  A sum_dxhat = A(0), sum_dxhat_xhat = A(0);
#pragma omp simd reduction(+ : sum_dxhat, sum_dxhat_xhat)
  for (int64_t i = 0; i < D; ++i) {
    const A xhat = (static_cast<A>(x[i]) - mean) * rstd;
    const A one_plus = A(1) + scale[i];
    A gu = static_cast<A>(dy[i]);
    if constexpr (ACT != Act::None) gu *= act_grad<A>(ACT, (xhat * w[i] + bias[i]) * one_plus + shift[i]);
    s0[i] += gu;
    s1[i] += gu * xhat;
    const A dxhat = gu * one_plus * w[i];
    scratch[i] = dxhat;
    sum_dxhat += dxhat;
    sum_dxhat_xhat += dxhat * xhat;
  }
  const A c1 = rms ? A(0) : sum_dxhat / A(D);
  const A c2 = sum_dxhat_xhat / A(D);
#pragma omp simd
  for (int64_t i = 0; i < D; ++i) {
    const A xhat = (static_cast<A>(x[i]) - mean) * rstd;
    dx[i] = to_storage<DX>(rstd * (scratch[i] - c1 - xhat * c2));
  }
}

// Parameter gradients of one sample from its row sums: a = xhat * w + bias, u = a (1 + scale) + shift,
// so dshift = s0, dscale = w s1 + bias s0, and (1 + scale) s1, (1 + scale) s0 add to dw, db.
template <typename A>
inline void finish_sample(const A* __restrict s0, const A* __restrict s1, const RowParams<A>& p,
                          A* __restrict dshift, A* __restrict dscale, A* __restrict dw, A* __restrict db, int64_t D) {
#pragma omp simd
  for (int64_t i = 0; i < D; ++i) {
    const A one_plus = A(1) + p.scale[i];
    dshift[i] = s0[i];
    dscale[i] = p.w[i] * s1[i] + p.bias[i] * s0[i];
    dw[i] += one_plus * s1[i];
    db[i] += one_plus * s0[i];
  }
}

// Units (samples) are grouped into at most kMaxBlocks fixed blocks, each with its own dw/db
// partial; the partials are summed in block order. The split depends only on the shape, so
// gradients are identical for any thread count.
constexpr int64_t kMaxBlocks = 64;
inline int64_t num_blocks(int64_t units) { return std::min<int64_t>(units, kMaxBlocks); }
inline int64_t block_begin(int64_t blk, int64_t nblk, int64_t units) { return blk * units / nblk; }

template <typename A> inline void sum_partials(const A* partials, int64_t nblk, int64_t D, A* out) {
  for (int64_t i = 0; i < D; ++i) out[i] = A(0);
  for (int64_t k = 0; k < nblk; ++k)
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) out[i] += partials[k * D + i];
}

// Calls f.template operator()<ACT>() for the runtime act: kernels are instantiated per activation.
template <typename F> inline void dispatch_act(Act act, F&& f) {
  switch (act) {
    case Act::None: f.template operator()<Act::None>(); break;
    case Act::Silu: f.template operator()<Act::Silu>(); break;
    case Act::GeluTanh: f.template operator()<Act::GeluTanh>(); break;
  }
}

}  // namespace flowfm::cpu
