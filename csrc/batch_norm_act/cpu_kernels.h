// The batch_norm_act CPU kernels and their torch-facing functions, compiled once per CPU capability
// (included by cpu.cpp through common/cpu_variants.h: no include guard, no torch includes here).

struct Dims { int64_t B, C, L; };

// NaN stays NaN (as torch.relu): only a value known to be negative becomes 0.
template <bool RELU, typename A> FLOWFM_INLINE A relu_if(A u) { return RELU ? (u < A(0) ? A(0) : u) : u; }

// Per-channel mean, 1/sqrt(var + eps) and the unbiased variance (for the running estimate).
template <typename S>
void channel_stats(const S* x, Dims d, double eps, acc_t<S>* mean, acc_t<S>* rstd, acc_t<S>* var_unbiased) {
  using A = acc_t<S>;
  const int64_t n = d.B * d.L;
  // A task takes whole channels, up to kGrainElems values: a tiny batch stays on the calling thread
  // (waking the pool cost more than the work), and each channel's sums keep one order either way.
  at::parallel_for(0, d.C, grain_rows(n), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      A sum = A(0);
      for (int64_t b = 0; b < d.B; ++b) {
        const S* row = x + (b * d.C + c) * d.L;
#pragma omp simd reduction(+ : sum)
        for (int64_t l = 0; l < d.L; ++l) sum += static_cast<A>(row[l]);
      }
      const A m = sum / A(n);
      A sq = A(0);
      for (int64_t b = 0; b < d.B; ++b) {
        const S* row = x + (b * d.C + c) * d.L;
#pragma omp simd reduction(+ : sq)
        for (int64_t l = 0; l < d.L; ++l) {
          const A v = static_cast<A>(row[l]) - m;
          sq += v * v;
        }
      }
      mean[c] = m;
      rstd[c] = A(1) / std::sqrt(sq / A(n) + A(eps));
      var_unbiased[c] = n > 1 ? sq / A(n - 1) : std::numeric_limits<A>::quiet_NaN();
    }
  });
}

// y = act(x * alpha_c + beta_c), alpha = rstd w, beta = b - mean alpha, row by row.
template <typename S, bool RELU>
void apply(const S* x, S* y, Dims d, const acc_t<S>* mean, const acc_t<S>* rstd, const acc_t<S>* w,
           const acc_t<S>* bias) {
  using A = acc_t<S>;
  at::parallel_for(0, d.B * d.C, grain_rows(d.L), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t c = r % d.C;
      const A alpha = rstd[c] * (w ? w[c] : A(1));
      const A beta = (bias ? bias[c] : A(0)) - mean[c] * alpha;
      const S* __restrict xr = x + r * d.L;
      S* __restrict yr = y + r * d.L;
#pragma omp simd
      for (int64_t l = 0; l < d.L; ++l) yr[l] = to_storage<S>(relu_if<RELU>(static_cast<A>(xr[l]) * alpha + beta));
    }
  });
}

// Backward. g = dy * act'(u) with u = x alpha + beta (recomputed as the forward computed it); per
// channel sg = sum g and
// sgx = sum g xhat (one task per channel), then dx = rstd w (g - [training] (sg + xhat sgx) / n).
template <typename S, bool RELU>
void backward(const S* dy, const S* x, Dims d, const acc_t<S>* mean, const acc_t<S>* rstd, const acc_t<S>* w,
              const acc_t<S>* bias, bool training, S* dx, acc_t<S>* sg, acc_t<S>* sgx) {
  using A = acc_t<S>;
  const int64_t n = d.B * d.L;
  at::parallel_for(0, d.C, grain_rows(n), [&](int64_t c0, int64_t c1) {  // as channel_stats
    for (int64_t c = c0; c < c1; ++c) {
      const A m = mean[c], r = rstd[c], wc = w ? w[c] : A(1), bc = bias ? bias[c] : A(0);
      const A alpha = r * wc, beta = bc - m * alpha;  // the forward's fold: the same ReLU mask, bit for bit
      A s0 = A(0), s1 = A(0);
      for (int64_t b = 0; b < d.B; ++b) {
        const S* __restrict xr = x + (b * d.C + c) * d.L;
        const S* __restrict dyr = dy + (b * d.C + c) * d.L;
#pragma omp simd reduction(+ : s0, s1)
        for (int64_t l = 0; l < d.L; ++l) {
          const A xh = (static_cast<A>(xr[l]) - m) * r;
          A g = static_cast<A>(dyr[l]);
          if constexpr (RELU) g = static_cast<A>(xr[l]) * alpha + beta > A(0) ? g : A(0);
          s0 += g;
          s1 += g * xh;
        }
      }
      sg[c] = s0;
      sgx[c] = s1;
    }
  });
  if (!dx) return;
  at::parallel_for(0, d.B * d.C, grain_rows(d.L), [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t c = row % d.C;
      const A m = mean[c], r = rstd[c], wc = w ? w[c] : A(1), bc = bias ? bias[c] : A(0);
      const A k = r * wc, beta = bc - m * k;
      const A c1 = training ? sg[c] / A(n) : A(0), c2 = training ? sgx[c] / A(n) : A(0);
      const S* __restrict xr = x + row * d.L;
      const S* __restrict dyr = dy + row * d.L;
      S* __restrict dxr = dx + row * d.L;
#pragma omp simd
      for (int64_t l = 0; l < d.L; ++l) {
        const A xh = (static_cast<A>(xr[l]) - m) * r;
        A g = static_cast<A>(dyr[l]);
        if constexpr (RELU) g = static_cast<A>(xr[l]) * k + beta > A(0) ? g : A(0);
        dxr[l] = to_storage<S>(k * (g - c1 - xh * c2));
      }
    }
  });
}

bool parse_relu(c10::string_view act) {
  TORCH_CHECK_VALUE(act == "none" || act == "relu",
                    flowfm::msg("batch_norm_act: act must be 'none' or 'relu', got '", std::string(act), "'"));
  return act == "relu";
}

Dims dims_of(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3,
                    flowfm::msg("batch_norm_act: x must be (B, C) or (B, C, L), got ", x.sizes()));
  return {x.size(0), x.size(1), x.dim() == 3 ? x.size(2) : 1};
}

void check_channel(const c10::optional<at::Tensor>& t, int64_t C, const char* name) {
  if (!t.has_value()) return;
  check_cpu_float(*t, name);
  check_shape(*t, {C}, name);
}

// -> (y, mean, rstd, var_unbiased); mean / rstd are what normalised x (saved for the backward),
// var_unbiased the batch's (training; empty in eval) for the caller's running estimate.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_cpu(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, bool training,
    double eps, c10::string_view act) {
  check_cpu_float(x_in, "x");
  const Dims d = dims_of(x_in);
  const bool relu = parse_relu(act);
  for (auto [t, name] : {std::pair{&weight, "weight"}, {&bias, "bias"}, {&running_mean, "running_mean"},
                         {&running_var, "running_var"}})
    check_channel(*t, d.C, name);
  TORCH_CHECK_VALUE(training || (running_mean.has_value() && running_var.has_value()),
                    "batch_norm_act: eval mode needs running_mean and running_var");
  TORCH_CHECK_VALUE(!training || d.B * d.L > 1,
                    flowfm::msg("batch_norm_act: expected more than 1 value per channel when training, got input "
                                "of size ", x_in.sizes()));
  const at::Tensor x = x_in.contiguous();
  const auto acc = acc_dtype(x.scalar_type());
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor mean, rstd, var_unbiased;
  const at::Tensor w = small_acc(weight, acc), b = small_acc(bias, acc);
  FLOWFM_DISPATCH_FLOATS(x.scalar_type(), "batch_norm_act", [&] {
    using A = acc_t<scalar_t>;
    if (training) {
      mean = at::empty({d.C}, x.options().dtype(acc));
      rstd = at::empty({d.C}, x.options().dtype(acc));
      var_unbiased = at::empty({d.C}, x.options().dtype(acc));
      channel_stats<scalar_t>(x.data_ptr<scalar_t>(), d, eps, mean.data_ptr<A>(), rstd.data_ptr<A>(),
                              var_unbiased.data_ptr<A>());
    } else {
      mean = running_mean->to(acc).contiguous().clone();
      rstd = (running_var->to(acc) + eps).rsqrt().contiguous();
      var_unbiased = at::empty({0}, x.options().dtype(acc));
    }
    auto run = [&]<bool RELU>() {
      apply<scalar_t, RELU>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), d, mean.data_ptr<A>(),
                            rstd.data_ptr<A>(), ptr_or_null<A>(w), ptr_or_null<A>(b));
    };
    relu ? run.template operator()<true>() : run.template operator()<false>();
  });
  return {y, mean, rstd, var_unbiased};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_cpu(
    const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& rstd,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, bool training,
    c10::string_view act, bool need_x) {
  check_cpu_float(x_in, "x");
  check_cpu_float(dy_in, "dy");
  check_shape(dy_in, x_in.sizes(), "dy");
  const Dims d = dims_of(x_in);
  const bool relu = parse_relu(act);
  check_channel(weight, d.C, "weight");
  check_channel(bias, d.C, "bias");
  const auto acc = acc_dtype(x_in.scalar_type());
  check_shape(mean, {d.C}, "mean");
  check_shape(rstd, {d.C}, "rstd");
  TORCH_CHECK_TYPE(mean.scalar_type() == acc && rstd.scalar_type() == acc, "batch_norm_act: mean/rstd dtype");
  const at::Tensor x = x_in.contiguous(), dy = dy_in.to(x.scalar_type()).contiguous();
  const at::Tensor m = mean.contiguous(), r = rstd.contiguous();
  const at::Tensor w = small_acc(weight, acc), b = small_acc(bias, acc);
  at::Tensor dx = need_x ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::empty({0}, x.options());
  at::Tensor sg = at::empty({d.C}, x.options().dtype(acc)), sgx = at::empty({d.C}, x.options().dtype(acc));
  FLOWFM_DISPATCH_FLOATS(x.scalar_type(), "batch_norm_act_backward", [&] {
    using A = acc_t<scalar_t>;
    auto run = [&]<bool RELU>() {
      backward<scalar_t, RELU>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), d, m.data_ptr<A>(), r.data_ptr<A>(),
                               ptr_or_null<A>(w), ptr_or_null<A>(b), training,
                               need_x ? dx.data_ptr<scalar_t>() : nullptr, sg.data_ptr<A>(), sgx.data_ptr<A>());
    };
    relu ? run.template operator()<true>() : run.template operator()<false>();
  });
  // dweight = sum g xhat, dbias = sum g, in the parameters' dtype.
  at::Tensor dweight = weight.has_value() ? sgx.to(weight->scalar_type()) : at::empty({0}, x.options());
  at::Tensor dbias = bias.has_value() ? sg.to(bias->scalar_type()) : at::empty({0}, x.options());
  return {dx, dweight, dbias};
}
