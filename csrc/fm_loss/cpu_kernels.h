// The fm_loss CPU kernels and their torch-facing functions, compiled once per CPU capability
// (included by cpu.cpp through common/cpu_variants.h: no include guard, no torch includes here).

// One chunk [0, n) of one sample; returns the sum of squared residuals. Pointers arrive as
// restrict-qualified arguments: read through a lambda's by-reference captures instead, GCC emits
// gathers and a reduction through memory (measured 14x slower).
template <typename S, bool GRAD>
acc_t<S> loss_chunk(const S* __restrict v, const S* __restrict x0, const S* __restrict x1, acc_t<S>* __restrict dv,
                    int64_t n, acc_t<S> c, acc_t<S> k) {
  using A = acc_t<S>;
  A acc = A(0);
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    const A r = static_cast<A>(v[i]) - (static_cast<A>(x1[i]) - c * static_cast<A>(x0[i]));
    acc += r * r;
    if constexpr (GRAD) dv[i] = k * r;
  }
  return acc;
}

template <typename S>
void loss_kernel(const S* v, const S* x0, const S* x1, const acc_t<S>* w, acc_t<S>* dv, acc_t<S>* part, int64_t B,
                 int64_t N, acc_t<S> c) {
  using A = acc_t<S>;
  const A inv_bn = A(2) / (A(B) * A(N));
  for_each_chunk(B, N, [&](int64_t b, int64_t begin, int64_t end, int64_t slot) {
    const int64_t o = b * N + begin, n = end - begin;
    part[slot] = dv ? loss_chunk<S, true>(v + o, x0 + o, x1 + o, dv + o, n, c, inv_bn * (w ? w[b] : A(1)))
                    : loss_chunk<S, false>(v + o, x0 + o, x1 + o, nullptr, n, c, A(0));
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fm_loss_cpu(const at::Tensor& v_in, const at::Tensor& x0_in,
                                                           const at::Tensor& x1_in,
                                                           const c10::optional<at::Tensor>& weight_in,
                                                           double sigma_min, bool need_grad) {
  check_cpu_float(v_in, "v");
  check_cpu_float(x0_in, "x0");
  check_cpu_float(x1_in, "x1");
  TORCH_CHECK_VALUE(x1_in.dim() >= 1 && x1_in.numel() > 0, "x1 must be a non-empty batched tensor");
  check_shape(x0_in, x1_in.sizes(), "x0");
  check_shape(v_in, x1_in.sizes(), "v");
  const int64_t B = x1_in.size(0), N = x1_in.numel() / B, per = chunks_per_sample(N);
  const bool weighted = weight_in.has_value() && weight_in->defined();
  if (weighted) {
    check_cpu_float(*weight_in, "weight");
    check_shape(*weight_in, {B}, "weight");
  }
  const auto st = common_float({v_in, x0_in, x1_in});
  const auto acc = acc_dtype(st);
  auto v = v_in.to(st).contiguous(), x0 = x0_in.to(st).contiguous(), x1 = x1_in.to(st).contiguous();
  auto w = weighted ? weight_in->to(acc).contiguous() : at::Tensor();
  auto fopt = v.options().dtype(acc);
  auto dv = need_grad ? at::empty(v.sizes(), fopt) : at::empty({0}, fopt);
  auto part = at::empty({B, per}, fopt);
  auto per_sample = at::empty({B}, fopt);
  auto loss = at::empty({}, fopt);
  FLOWFM_DISPATCH_FLOATS(st, "fm_loss", [&] {
    using A = acc_t<scalar_t>;
    loss_kernel<scalar_t>(v.data_ptr<scalar_t>(), x0.data_ptr<scalar_t>(), x1.data_ptr<scalar_t>(),
                          weighted ? w.data_ptr<A>() : nullptr, need_grad ? dv.data_ptr<A>() : nullptr,
                          part.data_ptr<A>(), B, N, A(1) - static_cast<A>(sigma_min));
    A* ps = per_sample.data_ptr<A>();
    sum_slots<A>(part.data_ptr<A>(), B, per, ps);
    const A* wp = weighted ? w.data_ptr<A>() : nullptr;
    A total = A(0);
    for (int64_t b = 0; b < B; ++b) {
      ps[b] /= A(N);
      total += (wp ? wp[b] : A(1)) * ps[b];
    }
    *loss.data_ptr<A>() = total / A(B);
  });
  return {loss, per_sample, dv};
}
