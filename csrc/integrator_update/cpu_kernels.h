// The integrator_update CPU kernels and their torch-facing functions, compiled once per CPU capability
// (included by cpu.cpp through common/cpu_variants.h: no include guard, no torch includes here).

// Spans take restrict-qualified pointer arguments (lambda captures make GCC vectorise with gathers).
template <typename S, typename V>
void euler_span(S* __restrict x, const V* __restrict v, int64_t n, acc_t<S> dt) {
  using A = acc_t<S>;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = to_storage<S>(static_cast<A>(x[i]) + dt * static_cast<A>(v[i]));
}

template <typename S, typename V>
void euler_kernel(S* x, const V* v, int64_t n, acc_t<S> dt) {
  at::parallel_for(0, n, kGrainElems, [&](int64_t begin, int64_t end) {
    euler_span<S, V>(x + begin, v + begin, end - begin, dt);
  });
}

void euler_step_cpu(const at::Tensor& x, const at::Tensor& v_in, double dt) {
  check_cpu_float(x, "x");
  check_cpu_float(v_in, "v");
  check_shape(v_in, x.sizes(), "v");
  if (x.numel() == 0) return;
  auto xc = x.is_contiguous() ? x : x.contiguous();
  const bool same = v_in.scalar_type() == x.scalar_type();
  // A v of another dtype is promoted exactly to the accumulation dtype (never rounded to x's).
  auto v = same ? v_in.contiguous() : v_in.to(acc_dtype(x.scalar_type())).contiguous();
  FLOWFM_DISPATCH_FLOATS(x.scalar_type(), "euler_step_", [&] {
    using A = acc_t<scalar_t>;
    if (same)
      euler_kernel<scalar_t, scalar_t>(xc.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), x.numel(), static_cast<A>(dt));
    else
      euler_kernel<scalar_t, A>(xc.data_ptr<scalar_t>(), v.data_ptr<A>(), x.numel(), static_cast<A>(dt));
  });
  if (!xc.is_same(x)) x.copy_(xc);
}

// Up to kMaxStages stage tensors per call (RK4 3/8 needs 4; more stages fold in a second pass).
constexpr int kMaxStages = 8;

// out = x + sum_j c_j k_j over one span, the stage count M a compile-time constant so the stage
// loop unrolls and the element loop vectorises. out may alias x or a stage: each element is read
// before it is written.
template <typename S, int M>
void combine_span(S* out, const S* x, const S* const* ks, const acc_t<S>* c, int64_t begin, int64_t end) {
  using A = acc_t<S>;
  const S* k[M];
  A cj[M];
  for (int j = 0; j < M; ++j) { k[j] = ks[j]; cj[j] = c[j]; }
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    A acc = static_cast<A>(x[i]);
    for (int j = 0; j < M; ++j) acc += cj[j] * static_cast<A>(k[j][i]);
    out[i] = to_storage<S>(acc);
  }
}

template <typename S>
void combine_kernel(S* out, const S* x, const std::vector<const S*>& ks, const std::vector<acc_t<S>>& c, int64_t n) {
  const int m = static_cast<int>(ks.size());
  at::parallel_for(0, n, kGrainElems, [&](int64_t begin, int64_t end) {
    switch (m) {
      case 1: combine_span<S, 1>(out, x, ks.data(), c.data(), begin, end); break;
      case 2: combine_span<S, 2>(out, x, ks.data(), c.data(), begin, end); break;
      case 3: combine_span<S, 3>(out, x, ks.data(), c.data(), begin, end); break;
      case 4: combine_span<S, 4>(out, x, ks.data(), c.data(), begin, end); break;
      case 5: combine_span<S, 5>(out, x, ks.data(), c.data(), begin, end); break;
      case 6: combine_span<S, 6>(out, x, ks.data(), c.data(), begin, end); break;
      case 7: combine_span<S, 7>(out, x, ks.data(), c.data(), begin, end); break;
      default: combine_span<S, kMaxStages>(out, x, ks.data(), c.data(), begin, end); break;
    }
  });
}

void rk_combine_cpu(const at::Tensor& out, const at::Tensor& x_in, at::TensorList ks_in, at::ArrayRef<double> bs,
                    double dt) {
  check_cpu_float(out, "out");
  check_cpu_float(x_in, "x");
  check_shape(x_in, out.sizes(), "x");
  TORCH_CHECK_VALUE(ks_in.size() == bs.size() && !ks_in.empty(), "ks and bs must be non-empty and of equal length");
  for (const auto& k : ks_in) {
    check_cpu_float(k, "ks[i]");
    check_shape(k, out.sizes(), "ks[i]");
  }
  if (out.numel() == 0) return;
  const auto st = out.scalar_type();
  const auto acc = acc_dtype(st);
  // Inputs in out's dtype when they already are (the common case: no copy), else promoted exactly.
  bool same = x_in.scalar_type() == st;
  for (const auto& k : ks_in) same = same && k.scalar_type() == st;
  const auto work = same ? st : acc;
  auto x = x_in.to(work).contiguous();
  std::vector<at::Tensor> ks;
  std::vector<double> cs;
  for (size_t j = 0; j < ks_in.size(); ++j)
    if (bs[j] != 0.0) {
      ks.push_back(ks_in[j].to(work).contiguous());
      cs.push_back(dt * bs[j]);
    }
  // More stages than one pass takes are folded in over several passes, reading the partial result
  // back: then out must not double as one of the stages, so the passes go to a fresh buffer.
  const bool direct = out.is_contiguous() && work == st && ks.size() <= static_cast<size_t>(kMaxStages);
  auto dst = direct ? out : at::empty(out.sizes(), out.options().dtype(work));
  FLOWFM_DISPATCH_FLOATS(work, "rk_combine", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* src = x.data_ptr<scalar_t>();
    if (ks.empty()) {
      if (!dst.is_same(x)) dst.copy_(x);
      return;
    }
    for (size_t j0 = 0; j0 < ks.size(); j0 += kMaxStages) {
      const size_t j1 = std::min(ks.size(), j0 + kMaxStages);
      std::vector<const scalar_t*> kp;
      std::vector<A> c;
      for (size_t j = j0; j < j1; ++j) {
        kp.push_back(ks[j].data_ptr<scalar_t>());
        c.push_back(static_cast<A>(cs[j]));
      }
      combine_kernel<scalar_t>(dst.data_ptr<scalar_t>(), src, kp, c, out.numel());
      src = dst.data_ptr<scalar_t>();  // later groups accumulate onto the partial result
    }
  });
  if (!dst.is_same(out)) out.copy_(dst);
}
