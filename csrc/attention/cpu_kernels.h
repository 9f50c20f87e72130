// The attention CPU kernels and their torch-facing functions, compiled once per CPU capability
// (included by cpu.cpp through common/cpu_variants.h: no include guard, no torch includes here).

struct Dims { int64_t B, H, T, D; };

// Strides of a (B, H, T, hd) tensor whose last dim is contiguous.
struct View {
  int64_t sb, sh, st;
  View(int64_t b, int64_t h, int64_t t) : sb(b), sh(h), st(t) {}
  explicit View(const at::Tensor& t) : View(t.stride(0), t.stride(1), t.stride(2)) {}
  int64_t at(int64_t b, int64_t h) const { return b * sb + h * sh; }
};

// One machine vector of accumulators (64 bytes with AVX-512, 32 with AVX2, 16 otherwise): every
// product below is accumulated in registers over its reduction index (written as loads into a
// scalar row, the accumulation went through memory on every step and ran 3x slower than ATen's
// kernel). Rows are padded with zeros to whole vectors. A vector wider than the registers is not
// kept in them: GCC splits a 64-byte vector on AVX2 through the stack (the avx2 variant ran at
// half the reference's speed, benchmarks/results/cpu-avx2-NOTES.md).
constexpr int64_t kVecBytes = FLOWFM_CPU_AVX512 ? 64 : FLOWFM_CPU_AVX2 ? 32 : 16;
template <typename A> struct Vec {
  typedef A v __attribute__((vector_size(kVecBytes)));
  static constexpr int64_t N = kVecBytes / sizeof(A);
  static FLOWFM_INLINE v load(const A* p) { v r; std::memcpy(&r, p, sizeof r); return r; }
  static FLOWFM_INLINE void store(A* p, v x) { std::memcpy(p, &x, sizeof x); }
  static FLOWFM_INLINE v splat(A a) { return v{} + a; }
};
inline int64_t pad_to(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// A head's (T, D) rows as A, zero-padded to (T, Dp); or transposed, (D, Tp).
template <typename S, typename A>
void load_rows(const S* src, int64_t st, int64_t T, int64_t D, int64_t Dp, A* dst) {
  for (int64_t j = 0; j < T; ++j) {
    for (int64_t c = 0; c < D; ++c) dst[j * Dp + c] = static_cast<A>(src[j * st + c]);
    for (int64_t c = D; c < Dp; ++c) dst[j * Dp + c] = A(0);
  }
}
template <typename S, typename A>
void load_transposed(const S* src, int64_t st, int64_t T, int64_t D, int64_t Tp, A* dst) {
  std::fill(dst, dst + D * Tp, A(0));
  for (int64_t j = 0; j < T; ++j)
    for (int64_t c = 0; c < D; ++c) dst[c * Tp + j] = static_cast<A>(src[j * st + c]);
}

// out[0:Lp] = sum_r a[r] * rows[r][0:Lp] over r < R (rows of stride Lp), in registers. C columns
// of vectors at once (each a[r] broadcast once for all of them) and two accumulators per column
// over r: 2 C independent FMA chains, as one chain waited on the FMA latency at every step.
template <int C, typename A>
FLOWFM_INLINE void combine_cols(const A* a, int64_t a_stride, const A* rows, int64_t R, int64_t Lp, A* out) {
  using V = Vec<A>;
  typename V::v acc0[C], acc1[C];
  for (int c = 0; c < C; ++c) acc0[c] = acc1[c] = V::splat(A(0));
  int64_t r = 0;
  for (; r + 2 <= R; r += 2) {
    const typename V::v a0 = V::splat(a[r * a_stride]), a1 = V::splat(a[(r + 1) * a_stride]);
    for (int c = 0; c < C; ++c) {
      acc0[c] += a0 * V::load(rows + r * Lp + c * V::N);
      acc1[c] += a1 * V::load(rows + (r + 1) * Lp + c * V::N);
    }
  }
  if (r < R) {
    const typename V::v a0 = V::splat(a[r * a_stride]);
    for (int c = 0; c < C; ++c) acc0[c] += a0 * V::load(rows + r * Lp + c * V::N);
  }
  for (int c = 0; c < C; ++c) V::store(out + c * V::N, acc0[c] + acc1[c]);
}
template <typename A>
FLOWFM_INLINE void combine_rows(const A* a, int64_t a_stride, const A* rows, int64_t R, int64_t Lp, A* out) {
  constexpr int64_t N = Vec<A>::N;
  int64_t l0 = 0;
  for (; l0 + 4 * N <= Lp; l0 += 4 * N) combine_cols<4>(a, a_stride, rows + l0, R, Lp, out + l0);
  for (; l0 < Lp; l0 += N) combine_cols<1>(a, a_stride, rows + l0, R, Lp, out + l0);
}

// s[0:T] -> exp(scale s - max) in place (padding lanes T..Tp -> exp of the clamp's floor, ~1e-38, so
// nothing in the sum); returns 1 / their sum.
template <typename A> FLOWFM_INLINE A softmax_row(A* s, int64_t T, int64_t Tp, A scale) {
  using V = Vec<A>;
  typename V::v mx = V::splat(-std::numeric_limits<A>::infinity());
  for (int64_t j = T; j < Tp; ++j) s[j] = -std::numeric_limits<A>::infinity();
  for (int64_t j0 = 0; j0 < Tp; j0 += V::N) {
    const typename V::v x = V::load(s + j0) * scale;
    V::store(s + j0, x);
    mx = mx > x ? mx : x;
  }
  A m = mx[0];
  for (int64_t l = 1; l < V::N; ++l) m = std::max(m, mx[l]);
  for (int64_t j0 = 0; j0 < Tp; j0 += V::N) V::store(s + j0, V::load(s + j0) - m);
  exp_inplace(s, Tp);
  typename V::v acc = V::splat(A(0));
  for (int64_t j0 = 0; j0 < Tp; j0 += V::N) acc += V::load(s + j0);
  A sum = A(0);
  for (int64_t l = 0; l < V::N; ++l) sum += acc[l];
  return A(1) / sum;
}

// probs: (B, H, T, T) output, or null (no backward coming: each row's probabilities stay in a
// per-task buffer, no B H T^2 allocation per call, which the sampler would make at every step).
template <typename S>
void forward(const S* q, const S* k, const S* v, View vq, View vk, View vv, Dims d, acc_t<S> scale, S* out,
             acc_t<S>* probs) {
  using A = acc_t<S>;
  const int64_t T = d.T, D = d.D, Tp = pad_to(T, Vec<A>::N), Dp = pad_to(D, Vec<A>::N);
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t h0, int64_t h1) {
    std::vector<A> qf(T * Dp), kt(D * Tp), vf(T * Dp), s(Tp), o(Dp), prow(probs ? 0 : T);
    for (int64_t bh = h0; bh < h1; ++bh) {
      const int64_t b = bh / d.H, h = bh % d.H;
      load_rows(q + vq.at(b, h), vq.st, T, D, Dp, qf.data());
      load_transposed(k + vk.at(b, h), vk.st, T, D, Tp, kt.data());
      load_rows(v + vv.at(b, h), vv.st, T, D, Dp, vf.data());
      S* oh = out + bh * T * D;
      for (int64_t i = 0; i < T; ++i) {
        combine_rows(qf.data() + i * Dp, 1, kt.data(), D, Tp, s.data());  // s_j = q_i . k_j
        const A inv = softmax_row(s.data(), T, Tp, scale);
        A* __restrict pr = probs ? probs + (bh * T + i) * T : prow.data();
#pragma omp simd
        for (int64_t j = 0; j < T; ++j) pr[j] = s[j] * inv;
        combine_rows(pr, 1, vf.data(), T, Dp, o.data());  // o = sum_j p_ij v_j
        S* __restrict dst = oh + i * D;
#pragma omp simd
        for (int64_t c = 0; c < D; ++c) dst[c] = to_storage<S>(o[c]);
      }
    }
  });
}

// dS = P * (dP - rowsum(P * dP)) with dP = dO V^T; dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO.
template <typename S>
void backward(const S* dout, const S* q, const S* k, const S* v, View vq, View vk, View vv, Dims d, acc_t<S> scale,
              const acc_t<S>* probs, S* dq, S* dk, S* dv) {
  using A = acc_t<S>;
  const int64_t T = d.T, D = d.D, Tp = pad_to(T, Vec<A>::N), Dp = pad_to(D, Vec<A>::N);
  const View vo{d.H * T * D, T * D, D};  // dout and the gradients: contiguous (B, H, T, D)
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t h0, int64_t h1) {
    std::vector<A> qf(T * Dp), kf(T * Dp), vt(D * Tp), dof(T * Dp), ds(T * T), row(std::max(Tp, Dp));
    for (int64_t bh = h0; bh < h1; ++bh) {
      const int64_t b = bh / d.H, h = bh % d.H;
      load_rows(q + vq.at(b, h), vq.st, T, D, Dp, qf.data());
      load_rows(k + vk.at(b, h), vk.st, T, D, Dp, kf.data());
      load_transposed(v + vv.at(b, h), vv.st, T, D, Tp, vt.data());
      load_rows(dout + vo.at(b, h), vo.st, T, D, Dp, dof.data());
      const A* ph = probs + bh * T * T;
      S* dqh = dq + bh * T * D;
      for (int64_t i = 0; i < T; ++i) {
        const A* __restrict pr = ph + i * T;
        combine_rows(dof.data() + i * Dp, 1, vt.data(), D, Tp, row.data());  // dp_j = do_i . v_j
        A delta = A(0);
#pragma omp simd reduction(+ : delta)
        for (int64_t j = 0; j < T; ++j) delta += pr[j] * row[j];
        A* __restrict dsr = ds.data() + i * T;
#pragma omp simd
        for (int64_t j = 0; j < T; ++j) dsr[j] = pr[j] * (row[j] - delta) * scale;
        combine_rows(dsr, 1, kf.data(), T, Dp, row.data());  // dq_i = sum_j ds_ij k_j
#pragma omp simd
        for (int64_t c = 0; c < D; ++c) dqh[i * D + c] = to_storage<S>(row[c]);
      }
      S* dkh = dk + bh * T * D;
      S* dvh = dv + bh * T * D;
      for (int64_t j = 0; j < T; ++j) {
        combine_rows(ds.data() + j, T, qf.data(), T, Dp, row.data());  // dk_j = sum_i ds_ij q_i
#pragma omp simd
        for (int64_t c = 0; c < D; ++c) dkh[j * D + c] = to_storage<S>(row[c]);
        combine_rows(ph + j, T, dof.data(), T, Dp, row.data());  // dv_j = sum_i p_ij do_i
#pragma omp simd
        for (int64_t c = 0; c < D; ++c) dvh[j * D + c] = to_storage<S>(row[c]);
      }
    }
  });
}

// Each of q / k / v as (B, H, T, hd) with a unit-stride last dim (a transposed view of a fused qkv
// projection already is: only its outer strides differ).
at::Tensor unit_inner(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

Dims check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_cpu_float(q, "q");
  check_cpu_float(k, "k");
  check_cpu_float(v, "v");
  TORCH_CHECK_VALUE(q.dim() == 4, flowfm::msg("attention: q must be (B, H, T, hd), got ", q.sizes()));
  check_shape(k, q.sizes(), "k");
  check_shape(v, q.sizes(), "v");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "attention: q, k and v must have one dtype");
  return {q.size(0), q.size(1), q.size(2), q.size(3)};
}

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                 const at::Tensor& v_in, bool need_probs) {
  const Dims d = check(q_in, k_in, v_in);
  const at::Tensor q = unit_inner(q_in), k = unit_inner(k_in), v = unit_inner(v_in);
  const auto acc = acc_dtype(q.scalar_type());
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor probs = at::empty(need_probs ? at::IntArrayRef{d.B, d.H, d.T, d.T} : at::IntArrayRef{0},
                               q.options().dtype(acc));
  FLOWFM_DISPATCH_FLOATS(q.scalar_type(), "attention", [&] {
    using A = acc_t<scalar_t>;
    forward<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), View(q), View(k),
                      View(v), d, A(1) / std::sqrt(A(d.D)), out.data_ptr<scalar_t>(),
                      need_probs ? probs.data_ptr<A>() : nullptr);
  });
  return {out, probs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(const at::Tensor& dout_in,
                                                                      const at::Tensor& q_in, const at::Tensor& k_in,
                                                                      const at::Tensor& v_in, const at::Tensor& probs) {
  const Dims d = check(q_in, k_in, v_in);
  check_shape(dout_in, q_in.sizes(), "dout");
  check_shape(probs, {d.B, d.H, d.T, d.T}, "probs");
  const auto acc = acc_dtype(q_in.scalar_type());
  TORCH_CHECK_TYPE(probs.scalar_type() == acc, "attention: probs must be the accumulation dtype");
  const at::Tensor q = unit_inner(q_in), k = unit_inner(k_in), v = unit_inner(v_in);
  const at::Tensor dout = dout_in.to(q.scalar_type()).contiguous(), p = probs.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(q.sizes(), q.options()),
             dv = at::empty(q.sizes(), q.options());
  FLOWFM_DISPATCH_FLOATS(q.scalar_type(), "attention_backward", [&] {
    using A = acc_t<scalar_t>;
    backward<scalar_t>(dout.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                       v.data_ptr<scalar_t>(), View(q), View(k), View(v), d, A(1) / std::sqrt(A(d.D)),
                       p.data_ptr<A>(), dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>());
  });
  return {dq, dk, dv};
}
