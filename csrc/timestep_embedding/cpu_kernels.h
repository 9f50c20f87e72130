// The timestep_embedding CPU kernels and their torch-facing functions, compiled once per CPU capability
// (included by cpu.cpp through common/cpu_variants.h: no include guard, no torch includes here).

std::vector<double> freqs(int64_t half, double max_period) {
  std::vector<double> f(half);
  for (int64_t k = 0; k < half; ++k) f[k] = std::exp(-std::log(max_period) * double(k) / double(half));
  return f;
}

void check_args(const at::Tensor& t, int64_t dim, double max_period) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "t must be a CPU tensor for the cpp backend");
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()) || at::isIntegralType(t.scalar_type(), false),
                   flowfm::msg("t must be a float or integer tensor, got ", t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == 1, flowfm::msg("t must be (N,), got ", t.sizes()));
  TORCH_CHECK_VALUE(dim >= 1, flowfm::msg("dim must be >= 1, got ", dim));
  TORCH_CHECK_VALUE(max_period > 0, flowfm::msg("max_period must be > 0, got ", max_period));
}

// sin and cos of one fp32 argument, |x| <= kSinCosMax: Cody-Waite reduction by pi/2 in three parts
// (exact products for |j| < 2^12), Cephes' minimax polynomials on [-pi/4, pi/4] (~1 ulp), the
// quadrant by branch-free selects, so GCC vectorises a loop of them (libm's sinf/cosf keep a loop
// scalar: the fused loop ran 3x slower than torch.compile's SLEEF code with them).
constexpr float kSinCosMax = 8192.f;
FLOWFM_INLINE void sincos_fast(float x, float& s, float& c) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: round to nearest by add / subtract
  const float jf = (x * 0.636619772367581343f + kRound) - kRound;  // nearest multiple of pi/2
  const int32_t j = static_cast<int32_t>(jf);
  const float r = ((x - jf * 1.5703125f) - jf * 4.837512969970703125e-4f) - jf * 7.54978995489188216e-8f;
  const float r2 = r * r;
  const float ps = ((-1.9515295891e-4f * r2 + 8.3321608736e-3f) * r2 - 1.6666654611e-1f) * r2 * r + r;
  const float pc = ((2.443315711809948e-5f * r2 - 1.388731625493765e-3f) * r2 + 4.166664568298827e-2f) * r2 * r2 -
                   0.5f * r2 + 1.0f;
  // x = j pi/2 + r: quadrant q = j mod 4 rotates (sin r, cos r).
  const int32_t q = j & 3;
  const float sv = (q & 1) ? pc : ps;
  const float cv = (q & 1) ? ps : pc;
  s = (q & 2) ? -sv : sv;
  c = ((q + 1) & 2) ? -cv : cv;
}

at::Tensor timestep_embedding_cpu(const at::Tensor& t_in, int64_t dim, double max_period) {
  check_args(t_in, dim, max_period);
  const int64_t N = t_in.size(0), half = dim / 2;
  auto emb = at::empty({N, dim}, t_in.options().dtype(at::kFloat));
  if (dim % 2) emb.select(1, dim - 1).zero_();
  if (half == 0 || N == 0) return emb;
  // The reference's arithmetic (fp32 t, fp32 frequencies, fp32 products) in one loop writing
  // both halves of each row.
  const auto f = freqs(half, max_period);
  std::vector<float> fr(half);
  for (int64_t k = 0; k < half; ++k) fr[k] = static_cast<float>(f[k]);
  auto t = t_in.to(at::kFloat).contiguous();
  const float* tp = t.data_ptr<float>();
  // Frequencies are <= 1, so |t| bounds every argument; beyond the reduction's exact range (or for
  // inf / NaN t) ATen's SLEEF kernels take the whole tensor.
  const float tmax = t.abs().max().item<float>();
  if (!(tmax <= kSinCosMax)) {
    auto freq = at::from_blob(fr.data(), {half}, emb.options());
    auto args = at::outer(t, freq);
    auto cos_half = emb.narrow(1, 0, half), sin_half = emb.narrow(1, half, half);
    at::cos_out(cos_half, args);
    at::sin_out(sin_half, args);
    return emb;
  }
  float* out = emb.data_ptr<float>();
  const float* __restrict frp = fr.data();
  at::parallel_for(0, N, grain_rows(half), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      float* __restrict cos_row = out + n * dim;
      float* __restrict sin_row = cos_row + half;
      const float tn = tp[n];
#pragma omp simd
      for (int64_t k = 0; k < half; ++k) {
        float sv, cv;
        sincos_fast(tn * frp[k], sv, cv);
        cos_row[k] = cv;
        sin_row[k] = sv;
      }
    }
  });
  return emb;
}

at::Tensor timestep_embedding_backward_cpu(const at::Tensor& demb_in, const at::Tensor& t_in, int64_t dim,
                                           double max_period) {
  check_args(t_in, dim, max_period);
  const int64_t N = t_in.size(0), half = dim / 2;
  check_shape(demb_in, {N, dim}, "demb");
  auto t = t_in.to(at::kFloat).to(at::kDouble).contiguous();
  auto demb = demb_in.to(at::kDouble).contiguous();
  auto dt = at::empty({N}, t.options());
  const auto f = freqs(half, max_period);
  const double *tp = t.data_ptr<double>(), *g = demb.data_ptr<double>();
  double* out = dt.data_ptr<double>();
  at::parallel_for(0, N, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, dim)), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const double* row = g + n * dim;
      double acc = 0.0;
      for (int64_t k = 0; k < half; ++k) {
        const double a = tp[n] * f[k];
        acc += f[k] * (std::cos(a) * row[half + k] - std::sin(a) * row[k]);
      }
      out[n] = acc;
    }
  });
  return dt.to(at::isFloatingType(t_in.scalar_type()) ? t_in.scalar_type() : at::kFloat);
}
