// The fm_interpolate CPU kernels and their torch-facing functions, compiled once per CPU capability
// (included by cpu.cpp through common/cpu_variants.h: no include guard, no torch includes here).

// Kernels take restrict-qualified pointers as arguments (not lambda captures, through which GCC
// vectorises with gathers): each inner loop covers one sample's span of one chunk.
template <typename S>
void path_span(const S* __restrict x0, const S* __restrict x1, S* __restrict x_t, S* __restrict u_t, int64_t n,
               acc_t<S> tb, acc_t<S> c) {
  using A = acc_t<S>;
  const A a0 = A(1) - c * tb;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const A v0 = static_cast<A>(x0[i]), v1 = static_cast<A>(x1[i]);
    x_t[i] = to_storage<S>(a0 * v0 + tb * v1);
    u_t[i] = to_storage<S>(v1 - c * v0);
  }
}

template <typename S>
void forward_kernel(const S* x0, const S* x1, const acc_t<S>* t, S* x_t, S* u_t, int64_t B, int64_t N, acc_t<S> c) {
  at::parallel_for(0, B * N, kGrainElems, [&](int64_t begin, int64_t end) {
    for (int64_t i0 = begin; i0 < end;) {
      const int64_t b = i0 / N, i1 = std::min(end, (b + 1) * N);
      path_span<S>(x0 + i0, x1 + i0, x_t + i0, u_t + i0, i1 - i0, t[b], c);
      i0 = i1;
    }
  });
}

template <typename S, bool DX, bool DU>
acc_t<S> path_grad_span(const S* __restrict dx_t, const S* __restrict du_t, const S* __restrict x0,
                        const S* __restrict x1, S* __restrict dx0, S* __restrict dx1, int64_t n, acc_t<S> tb,
                        acc_t<S> c) {
  using A = acc_t<S>;
  const A a0 = A(1) - c * tb;
  A acc = A(0);
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    const A gx = DX ? static_cast<A>(dx_t[i]) : A(0);
    const A gu = DU ? static_cast<A>(du_t[i]) : A(0);
    dx0[i] = to_storage<S>(a0 * gx - c * gu);
    dx1[i] = to_storage<S>(tb * gx + gu);
    acc += gx * (static_cast<A>(x1[i]) - c * static_cast<A>(x0[i]));
  }
  return acc;
}

template <typename S>
void backward_kernel(const S* dx_t, const S* du_t, const S* x0, const S* x1, const acc_t<S>* t, S* dx0, S* dx1,
                     acc_t<S>* dt_part, int64_t B, int64_t N, acc_t<S> c) {
  using A = acc_t<S>;
  for_each_chunk(B, N, [&](int64_t b, int64_t begin, int64_t end, int64_t slot) {
    const int64_t o = b * N + begin, n = end - begin;
    const S *gx = dx_t ? dx_t + o : nullptr, *gu = du_t ? du_t + o : nullptr;
    A part;
    if (gx && gu) part = path_grad_span<S, true, true>(gx, gu, x0 + o, x1 + o, dx0 + o, dx1 + o, n, t[b], c);
    else if (gx) part = path_grad_span<S, true, false>(gx, gu, x0 + o, x1 + o, dx0 + o, dx1 + o, n, t[b], c);
    else if (gu) part = path_grad_span<S, false, true>(gx, gu, x0 + o, x1 + o, dx0 + o, dx1 + o, n, t[b], c);
    else part = path_grad_span<S, false, false>(gx, gu, x0 + o, x1 + o, dx0 + o, dx1 + o, n, t[b], c);
    dt_part[slot] = part;
  });
}

void check_pair(const at::Tensor& x0, const at::Tensor& x1, const at::Tensor& t) {
  check_cpu_float(x0, "x0");
  check_cpu_float(x1, "x1");
  check_cpu_float(t, "t");
  TORCH_CHECK_VALUE(x1.dim() >= 1 && x1.numel() > 0, "x1 must be a non-empty batched tensor");
  check_shape(x0, x1.sizes(), "x0");
  check_shape(t, {x1.size(0)}, "t");
}

std::tuple<at::Tensor, at::Tensor> fm_interpolate_cpu(const at::Tensor& x0_in, const at::Tensor& x1_in,
                                                      const at::Tensor& t_in, double sigma_min) {
  check_pair(x0_in, x1_in, t_in);
  const auto st = common_float({x0_in, x1_in});
  auto x0 = x0_in.to(st).contiguous(), x1 = x1_in.to(st).contiguous();
  auto t = t_in.to(acc_dtype(st)).contiguous();
  const int64_t B = x1.size(0), N = x1.numel() / B;
  auto x_t = at::empty(x1.sizes(), x1.options());
  auto u_t = at::empty(x1.sizes(), x1.options());
  FLOWFM_DISPATCH_FLOATS(st, "fm_interpolate", [&] {
    using A = acc_t<scalar_t>;
    forward_kernel<scalar_t>(x0.data_ptr<scalar_t>(), x1.data_ptr<scalar_t>(), t.data_ptr<A>(),
                             x_t.data_ptr<scalar_t>(), u_t.data_ptr<scalar_t>(), B, N, A(1) - static_cast<A>(sigma_min));
  });
  // Results in x1's dtype (a no-op when the inputs already share it).
  return {x_t.to(x1_in.scalar_type()), u_t.to(x1_in.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fm_interpolate_backward_cpu(
    const c10::optional<at::Tensor>& dx_t_in, const c10::optional<at::Tensor>& du_t_in, const at::Tensor& x0_in,
    const at::Tensor& x1_in, const at::Tensor& t_in, double sigma_min) {
  check_pair(x0_in, x1_in, t_in);
  const bool has_dx = dx_t_in.has_value() && dx_t_in->defined(), has_du = du_t_in.has_value() && du_t_in->defined();
  if (has_dx) check_shape(*dx_t_in, x1_in.sizes(), "dx_t");
  if (has_du) check_shape(*du_t_in, x1_in.sizes(), "du_t");
  const auto st = common_float({x0_in, x1_in});
  auto x0 = x0_in.to(st).contiguous(), x1 = x1_in.to(st).contiguous();
  auto dx_t = has_dx ? dx_t_in->to(st).contiguous() : at::Tensor();
  auto du_t = has_du ? du_t_in->to(st).contiguous() : at::Tensor();
  const auto acc = acc_dtype(st);
  auto t = t_in.to(acc).contiguous();
  const int64_t B = x1.size(0), N = x1.numel() / B, per = chunks_per_sample(N);
  auto dx0 = at::empty_like(x1), dx1 = at::empty_like(x1);
  auto dt_part = at::empty({B, per}, t.options());
  auto dt = at::empty({B}, t.options());
  FLOWFM_DISPATCH_FLOATS(st, "fm_interpolate_backward", [&] {
    using A = acc_t<scalar_t>;
    backward_kernel<scalar_t>(has_dx ? dx_t.data_ptr<scalar_t>() : nullptr,
                              has_du ? du_t.data_ptr<scalar_t>() : nullptr, x0.data_ptr<scalar_t>(),
                              x1.data_ptr<scalar_t>(), t.data_ptr<A>(), dx0.data_ptr<scalar_t>(),
                              dx1.data_ptr<scalar_t>(), dt_part.data_ptr<A>(), B, N, A(1) - static_cast<A>(sigma_min));
    sum_slots<A>(dt_part.data_ptr<A>(), B, per, dt.data_ptr<A>());
  });
  return {dx0.to(x0_in.scalar_type()), dx1.to(x1_in.scalar_type()), dt.to(t_in.scalar_type())};
}
