// Row kernels of the token norms (LayerNorm / RMSNorm over D) with the adaLN modulation and
// activation, shared by norm_modulate and the fused gated_residual_norm_modulate.
//
//   xhat = (x - mean) * rstd          (rms: mean = 0)
//   a    = xhat * w + bias            (the norm's own affine; ones / zeros when absent)
//   u    = a * (1 + scale_b) + shift_b
//   y    = act(u)
//
// Included by the kernels headers of both, once per CPU capability (no include guard).
//
// A row arrives as fp32 (or float64) values in a scratch buffer, so the caller decides where x
// comes from (a plain load, or the just-computed residual res + gate * h).

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

// The sample's modulation folded into the norm's affine once per sample (amortised over its T
// rows): u = xhat * alpha + beta with alpha = w (1 + scale), beta = bias (1 + scale) + shift, so the
// row loops load two per-feature vectors instead of four.
template <typename A>
inline void fold_sample(const RowParams<A>& p, A* __restrict alpha, A* __restrict beta, int64_t D) {
#pragma omp simd
  for (int64_t i = 0; i < D; ++i) {
    const A one_plus = A(1) + p.scale[i];
    alpha[i] = p.w[i] * one_plus;
    beta[i] = p.bias[i] * one_plus + p.shift[i];
  }
}

// A token kernel's modulation, shared read-only by its tasks: shift / scale (B, D) and the norm's
// weight / bias (D,), each possibly absent (zeros / ones stand in).
template <typename A> class TokenMods {
 public:
  TokenMods(const A* shift, const A* scale, const A* w, const A* bias, int64_t D)
      : def_(D), shift_(shift), scale_(scale), w_(def_.or_ones(w)), bias_(def_.or_zeros(bias)), D_(D) {}
  RowParams<A> of(int64_t b) const {
    return {shift_ ? shift_ + b * D_ : def_.zeros.data(), scale_ ? scale_ + b * D_ : def_.zeros.data(), w_, bias_};
  }

 private:
  Defaults<A> def_;  // first: the pointers below may point into it
  const A *shift_, *scale_, *w_, *bias_;
  int64_t D_;
};

// One task's fold_sample of the sample its rows belong to, recomputed only when the sample changes.
template <typename A> struct SampleFold {
  std::vector<A> alpha, beta;
  int64_t sample = -1;
  explicit SampleFold(int64_t D) : alpha(D), beta(D) {}
  void at(const TokenMods<A>& mods, int64_t b) {
    if (b == sample) return;
    fold_sample<A>(mods.of(b), alpha.data(), beta.data(), static_cast<int64_t>(alpha.size()));
    sample = b;
  }
};

// fp32 rows: sums in four independent 8-lane accumulators. An `omp simd` reduction keeps one
// vector accumulator, so a row of a few hundred values waits on the add latency (D = 128: the
// forward ran 1.4x slower that way in a microbenchmark on this machine's EPYC).
typedef float f32x8 __attribute__((vector_size(32)));
FLOWFM_INLINE f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
typedef float f32x4 __attribute__((vector_size(16)));
// Pairwise, three dependent adds (a lane-by-lane loop was seven, at every row's two reductions).
FLOWFM_INLINE float hsum8(f32x8 v) {
  const f32x4 q = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  const f32x4 p = q + __builtin_shufflevector(q, q, 2, 3, 0, 1);
  return p[0] + p[1];
}
// sum_i (x_i - shift)^SQUARE ? 2 : 1 over the row.
template <bool SQUARE>
FLOWFM_INLINE float row_sum_f32(const float* __restrict x, int64_t D, float shift) {
  const f32x8 sv = {shift, shift, shift, shift, shift, shift, shift, shift};
  f32x8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t i = 0;
  auto term = [&](int64_t k) {
    const f32x8 c = load8(x + k) - sv;
    if constexpr (SQUARE) return c * c; else return c;
  };
  for (; i + 32 <= D; i += 32) {
    a0 += term(i);
    a1 += term(i + 8);
    a2 += term(i + 16);
    a3 += term(i + 24);
  }
  for (; i + 8 <= D; i += 8) a0 += term(i);
  float r = hsum8((a0 + a1) + (a2 + a3));
  for (; i < D; ++i) {
    const float c = x[i] - shift;
    r += SQUARE ? c * c : c;
  }
  return r;
}

// Row statistics (two passes: mean, then the centred sum of squares); x is read as X (the
// storage dtype or an fp32 scratch row).
template <typename A, typename X>
inline void row_stats(const X* __restrict x, int64_t D, bool rms, A eps, A& mean, A& rstd) {
  if constexpr (std::is_same_v<A, float> && std::is_same_v<X, float>) {
    const float m = rms ? 0.f : row_sum_f32<false>(x, D, 0.f) / float(D);
    mean = m;
    rstd = 1.f / std::sqrt(row_sum_f32<true>(x, D, m) / float(D) + eps);
    return;
  }
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

// y = act(xhat * alpha + beta) for one row (alpha, beta from fold_sample); ``scratch``: D values
// (see act_store).
template <Act ACT, typename A, typename X, typename S>
inline void row_forward(const X* __restrict x, S* __restrict y, int64_t D, A mean, A rstd, const A* __restrict alpha,
                        const A* __restrict beta, A* __restrict scratch) {
  act_store<ACT>(y, scratch, D, [&](int64_t i) { return (static_cast<A>(x[i]) - mean) * rstd * alpha[i] + beta[i]; });
}

// Per-sample sums over the rows of one sample: s0 = sum_t gu, s1 = sum_t gu * xhat, with
// gu = dL/du. Every parameter gradient follows from them once per sample (finish_sample), so the
// per-element loop updates two accumulators instead of four (dshift, dscale, dw, db).
template <typename A> struct RowSums {
  A* s0;
  A* s1;
};

// dx of one row given dy, accumulating s0/s1 (alpha, beta from fold_sample). x is read as X (the
// storage dtype, or an fp32 scratch row), dx written as DX. Two passes over the row (L1-resident):
// the first only reduces (sum dxhat, sum dxhat * xhat), the second recomputes xhat and does every
// store: the loops are bound by loads and stores, and this order stores least. With an
// activation, gu = dy * act'(u) (an exp and a division) is computed once, in the first pass (fp32:
// act'(u) by act_inplace over the row just before it), and waits in ``scratch`` (D values).
// Pointers are restrict-qualified arguments so the loops vectorise with plain loads and stores.
template <Act ACT, typename A, typename X, typename S, typename DX>
inline void row_backward(const X* __restrict x, const S* __restrict dy, A* __restrict scratch, DX* __restrict dx,
                         int64_t D, bool rms, A mean, A rstd, const A* __restrict alpha, const A* __restrict beta,
                         const RowSums<A>& g) {
  A* __restrict s0 = g.s0;
  A* __restrict s1 = g.s1;
  constexpr bool kActRow = ACT != Act::None && std::is_same_v<A, float>;
  if constexpr (kActRow) {  // act'(u) over the row first (act_inplace), then gu = dy * act'(u)
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) scratch[i] = (static_cast<A>(x[i]) - mean) * rstd * alpha[i] + beta[i];
    act_inplace<ACT, true>(scratch, D);
  }
  A sum_dxhat = A(0), sum_dxhat_xhat = A(0);
#pragma omp simd reduction(+ : sum_dxhat, sum_dxhat_xhat)
  for (int64_t i = 0; i < D; ++i) {
    const A xh = (static_cast<A>(x[i]) - mean) * rstd;
    A gu = static_cast<A>(dy[i]);
    if constexpr (kActRow) {
      gu *= scratch[i];
      scratch[i] = gu;
    } else if constexpr (ACT != Act::None) {
      gu *= act_grad<A>(ACT, xh * alpha[i] + beta[i]);
      scratch[i] = gu;
    }
    const A dxhat = gu * alpha[i];
    sum_dxhat += dxhat;
    sum_dxhat_xhat += dxhat * xh;
  }
  const A c1 = rms ? A(0) : sum_dxhat / A(D);
  const A c2 = sum_dxhat_xhat / A(D);
#pragma omp simd
  for (int64_t i = 0; i < D; ++i) {
    const A xh = (static_cast<A>(x[i]) - mean) * rstd;
    const A gu = ACT != Act::None ? scratch[i] : static_cast<A>(dy[i]);
    s0[i] += gu;
    s1[i] += gu * xh;
    dx[i] = to_storage<DX>(rstd * (gu * alpha[i] - c1 - xh * c2));
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

