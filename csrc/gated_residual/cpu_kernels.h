// The gated_residual CPU kernels and their torch-facing functions, compiled once per CPU capability
// (included by cpu.cpp through common/cpu_variants.h: no include guard, no torch includes here).
#include "../common/cpu_norm_rows.h"

struct Dims { int64_t B, T, D; };
Dims dims_of(const at::Tensor& res) {
  return res.dim() == 3 ? Dims{res.size(0), res.size(1), res.size(2)} : Dims{res.size(0), 1, res.size(1)};
}

// Row loops take restrict-qualified pointer arguments (lambda captures make GCC vectorise with gathers).
template <typename S>
void gated_row(const S* __restrict r, const S* __restrict h, const acc_t<S>* __restrict g, S* __restrict y,
               int64_t D) {
  using A = acc_t<S>;
#pragma omp simd
  for (int64_t i = 0; i < D; ++i) y[i] = to_storage<S>(static_cast<A>(r[i]) + g[i] * static_cast<A>(h[i]));
}

template <typename S>
void gated_row_grad(const S* __restrict dy, const S* __restrict h, const acc_t<S>* __restrict g, S* __restrict dh,
                    acc_t<S>* __restrict dg, int64_t D) {
  using A = acc_t<S>;
#pragma omp simd
  for (int64_t i = 0; i < D; ++i) {
    const A dyv = static_cast<A>(dy[i]);
    dh[i] = to_storage<S>(dyv * g[i]);
    dg[i] += dyv * static_cast<A>(h[i]);
  }
}

template <typename scalar_t>
void forward_kernel(const scalar_t* r, const scalar_t* hp, const acc_t<scalar_t>* g, scalar_t* y, Dims d) {
  at::parallel_for(0, d.B * d.T, grain_rows(d.D), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t o = row * d.D;
      gated_row<scalar_t>(r + o, hp + o, g + (row / d.T) * d.D, y + o, d.D);
    }
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* dyp, const scalar_t* hp, const acc_t<scalar_t>* g, scalar_t* dhp,
                     acc_t<scalar_t>* dg, Dims d) {
  using A = acc_t<scalar_t>;
  at::parallel_for(0, d.B, grain_rows(d.T * d.D), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      A* dgb = dg + b * d.D;
      for (int64_t i = 0; i < d.D; ++i) dgb[i] = A(0);
      for (int64_t t = 0; t < d.T; ++t) {
        const int64_t o = (b * d.T + t) * d.D;
        gated_row_grad<scalar_t>(dyp + o, hp + o, g + b * d.D, dhp + o, dgb, d.D);
      }
    }
  });
}

at::Tensor gated_residual_cpu(const at::Tensor& res_in, const at::Tensor& h_in, const at::Tensor& gate_in) {
  check_cpu_float(res_in, "res");
  check_cpu_float(h_in, "h");
  check_cpu_float(gate_in, "gate");
  TORCH_CHECK_VALUE(res_in.dim() == 2 || res_in.dim() == 3, "res must be (B, T, D) or (N, D)");
  check_shape(h_in, res_in.sizes(), "h");
  const Dims d = dims_of(res_in);
  check_shape(gate_in, {d.B, d.D}, "gate");
  auto res = res_in.contiguous();
  auto h = h_in.to(res.scalar_type()).contiguous();
  auto gate = gate_in.to(acc_dtype(res.scalar_type())).contiguous();
  auto out = at::empty_like(res);
  FLOWFM_DISPATCH_FLOATS(res.scalar_type(), "gated_residual", [&] {
    forward_kernel<scalar_t>(res.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), gate.data_ptr<acc_t<scalar_t>>(),
                             out.data_ptr<scalar_t>(), d);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gated_residual_backward_cpu(const at::Tensor& dy_in, const at::Tensor& h_in,
                                                               const at::Tensor& gate_in) {
  check_cpu_float(dy_in, "dy");
  check_cpu_float(h_in, "h");
  check_cpu_float(gate_in, "gate");
  check_shape(dy_in, h_in.sizes(), "dy");
  const Dims d = dims_of(h_in);
  check_shape(gate_in, {d.B, d.D}, "gate");
  auto h = h_in.contiguous();
  auto dy = dy_in.to(h.scalar_type()).contiguous();
  auto gate = gate_in.to(acc_dtype(h.scalar_type())).contiguous();
  auto dh = at::empty_like(h);
  auto dgate = at::empty({d.B, d.D}, gate.options());
  FLOWFM_DISPATCH_FLOATS(h.scalar_type(), "gated_residual_backward", [&] {
    backward_kernel<scalar_t>(dy.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), gate.data_ptr<acc_t<scalar_t>>(),
                              dh.data_ptr<scalar_t>(), dgate.data_ptr<acc_t<scalar_t>>(), d);
  });
  return {dh, dgate.to(gate_in.scalar_type())};
}

// gated_residual_norm_modulate: the adaLN-Zero chain r = res + gate * h; y = act(norm(r) * (1 +
// scale) + shift), token kinds only. One pass reads res and h and writes r and y; the norm sees r
// rounded to res's dtype, exactly as the unfused chain does.

template <typename S, Act ACT>
void fused_forward(const S* res, const S* h, const acc_t<S>* gate, S* new_res, S* y, acc_t<S>* mean, acc_t<S>* rstd,
                   Dims d, bool rms, acc_t<S> eps, const acc_t<S>* sh, const acc_t<S>* sc, const acc_t<S>* w,
                   const acc_t<S>* bi) {
  using A = acc_t<S>;
  const TokenMods<A> mods(sh, sc, w, bi, d.D);
  at::parallel_for(0, d.B * d.T, grain_rows(d.D), [&](int64_t begin, int64_t end) {
    SampleFold<A> fold(d.D);
    std::vector<A> scratch(d.D);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / d.T, o = row * d.D;
      const A* g = gate + b * d.D;
      fold.at(mods, b);
      // The norm sees r rounded to the residual's dtype, as the unfused chain does.
      gated_row<S>(res + o, h + o, g, new_res + o, d.D);
      row_stats<A, S>(new_res + o, d.D, rms, eps, mean[row], rstd[row]);
      row_forward<ACT, A, S, S>(new_res + o, y + o, d.D, mean[row], rstd[row], fold.alpha.data(), fold.beta.data(),
                                scratch.data());
    }
  });
}

// Residual part of one row's backward: dres = dr (+ dnew_res), dh = dres * gate, dgate += dres * h.
template <typename S, bool HAS_DNEW>
void residual_row_grad(const acc_t<S>* __restrict dr, const S* __restrict dnew, const S* __restrict h,
                       const acc_t<S>* __restrict g, S* __restrict dres, S* __restrict dh, acc_t<S>* __restrict dg,
                       int64_t D) {
  using A = acc_t<S>;
#pragma omp simd
  for (int64_t i = 0; i < D; ++i) {
    const A drv = dr[i] + (HAS_DNEW ? static_cast<A>(dnew[i]) : A(0));
    dres[i] = to_storage<S>(drv);
    dh[i] = to_storage<S>(drv * g[i]);
    dg[i] += drv * static_cast<A>(h[i]);
  }
}

template <typename S, Act ACT>
void fused_backward(const S* dnew_res, const S* dy, const S* new_res, const S* h, const acc_t<S>* gate,
                    const acc_t<S>* mean, const acc_t<S>* rstd, S* dres, S* dh, acc_t<S>* dgate, Dims d, bool rms,
                    const acc_t<S>* sh, const acc_t<S>* sc, const acc_t<S>* w, const acc_t<S>* bi, acc_t<S>* dshift,
                    acc_t<S>* dscale, acc_t<S>* dw_part, acc_t<S>* db_part, int64_t nblk) {
  using A = acc_t<S>;
  const TokenMods<A> mods(sh, sc, w, bi, d.D);
  at::parallel_for(0, nblk, 1, [&](int64_t blk_begin, int64_t blk_end) {
    std::vector<A> scratch(d.D), dr(d.D), s0(d.D), s1(d.D), dsh_scratch(d.D), dsc_scratch(d.D);
    SampleFold<A> fold(d.D);
    for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
      A* dwp = dw_part + blk * d.D;
      A* dbp = db_part + blk * d.D;
      std::fill(dwp, dwp + d.D, A(0));
      std::fill(dbp, dbp + d.D, A(0));
      for (int64_t b = block_begin(blk, nblk, d.B); b < block_begin(blk + 1, nblk, d.B); ++b) {
        A* dgb = dgate + b * d.D;
        std::fill(dgb, dgb + d.D, A(0));
        std::fill(s0.begin(), s0.end(), A(0));
        std::fill(s1.begin(), s1.end(), A(0));
        const A* g = gate + b * d.D;
        const RowParams<A> p = mods.of(b);
        fold.at(mods, b);
        const RowSums<A> rs{s0.data(), s1.data()};
        for (int64_t t = 0; t < d.T; ++t) {
          const int64_t row = b * d.T + t, o = row * d.D;
          row_backward<ACT, A, S, S, A>(new_res + o, dy + o, scratch.data(), dr.data(), d.D, rms, mean[row],
                                         rstd[row], fold.alpha.data(), fold.beta.data(), rs);
          if (dnew_res)
            residual_row_grad<S, true>(dr.data(), dnew_res + o, h + o, g, dres + o, dh + o, dgb, d.D);
          else
            residual_row_grad<S, false>(dr.data(), nullptr, h + o, g, dres + o, dh + o, dgb, d.D);
        }
        finish_sample<A>(s0.data(), s1.data(), p, dshift ? dshift + b * d.D : dsh_scratch.data(),
                         dscale ? dscale + b * d.D : dsc_scratch.data(), dwp, dbp, d.D);
      }
    }
  });
}

// half_via_float: fp16 tensors run the fp32 kernels of the fused chain on converted copies (outputs
// converted back): c10::Half loads and stores do not vectorise (GCC 12 without AVX512-FP16) and the
// fp16 chain ran ~6x slower than fp32, while ATen's conversions are vectorised; same arithmetic, one
// rounding. Measured (256, 30, 256) forward: 3.0 -> 1.7 ms. (The plain gated residual, ~4x, got
// slower converted, so it keeps its fp16 kernel.)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_cpu(
    const at::Tensor& res_in, const at::Tensor& h_in, const at::Tensor& gate_in, const c10::optional<at::Tensor>& shift,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, c10::string_view kind_s, double eps, c10::string_view act_s) {
  const Kind kind = parse_kind(kind_s);
  const Act act = parse_act(act_s);
  TORCH_CHECK_VALUE(kind != Kind::Group, "gated_residual_norm_modulate takes kind 'layer' or 'rms'");
  TORCH_CHECK_VALUE(eps > 0, "eps must be > 0");
  check_cpu_float(res_in, "res");
  check_cpu_float(h_in, "h");
  check_cpu_float(gate_in, "gate");
  TORCH_CHECK_VALUE(res_in.dim() == 2 || res_in.dim() == 3, "res must be (B, T, D) or (N, D)");
  check_shape(h_in, res_in.sizes(), "h");
  const Dims d = dims_of(res_in);
  check_shape(gate_in, {d.B, d.D}, "gate");
  for (auto [t, name, shape] : {std::tuple{&shift, "shift", std::vector<int64_t>{d.B, d.D}},
                                std::tuple{&scale, "scale", std::vector<int64_t>{d.B, d.D}},
                                std::tuple{&weight, "weight", std::vector<int64_t>{d.D}},
                                std::tuple{&bias, "bias", std::vector<int64_t>{d.D}}}) {
    if (t->has_value()) {
      check_cpu_float(**t, name);
      check_shape(**t, shape, name);
    }
  }
  if (res_in.scalar_type() == at::kHalf) {  // see half_via_float
    auto [new_res, y, mean, rstd] = fused_cpu(res_in.to(at::kFloat), h_in, gate_in, shift, scale, weight, bias, kind_s,
                                              eps, act_s);
    return {new_res.to(at::kHalf), y.to(at::kHalf), mean, rstd};
  }
  auto res = res_in.contiguous();
  auto h = h_in.to(res.scalar_type()).contiguous();
  const auto acc = acc_dtype(res.scalar_type());
  auto gate = gate_in.to(acc).contiguous();
  auto new_res = at::empty_like(res);
  auto y = at::empty_like(res);
  auto mean = at::empty({d.B * d.T}, res.options().dtype(acc));
  auto rstd = at::empty({d.B * d.T}, res.options().dtype(acc));
  auto sh = small_acc(shift, acc), sc = small_acc(scale, acc), w = small_acc(weight, acc), bi = small_acc(bias, acc);
  FLOWFM_DISPATCH_FLOATS(res.scalar_type(), "gated_residual_norm_modulate", [&] {
    using A = acc_t<scalar_t>;
    dispatch_act(act, [&]<Act ACT>() {
      fused_forward<scalar_t, ACT>(res.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), gate.data_ptr<A>(),
                                   new_res.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), mean.data_ptr<A>(),
                                   rstd.data_ptr<A>(), d, kind == Kind::Rms, static_cast<A>(eps), ptr_or_null<A>(sh),
                                   ptr_or_null<A>(sc), ptr_or_null<A>(w), ptr_or_null<A>(bi));
    });
  });
  return {new_res, y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_backward_cpu(
    const c10::optional<at::Tensor>& dnew_res_in, const at::Tensor& dy_in, const at::Tensor& new_res_in,
    const at::Tensor& h_in, const at::Tensor& gate_in, const at::Tensor& mean_in, const at::Tensor& rstd_in,
    const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, c10::string_view kind_s,
    c10::string_view act_s) {
  const Kind kind = parse_kind(kind_s);
  const Act act = parse_act(act_s);
  TORCH_CHECK_VALUE(kind != Kind::Group, "gated_residual_norm_modulate takes kind 'layer' or 'rms'");
  check_cpu_float(new_res_in, "new_res");
  TORCH_CHECK_VALUE(new_res_in.dim() == 2 || new_res_in.dim() == 3, "new_res must be (B, T, D) or (N, D)");
  const Dims d = dims_of(new_res_in);
  check_shape(dy_in, new_res_in.sizes(), "dy");
  check_shape(h_in, new_res_in.sizes(), "h");
  check_shape(gate_in, {d.B, d.D}, "gate");
  if (dnew_res_in.has_value()) check_shape(*dnew_res_in, new_res_in.sizes(), "dnew_res");
  TORCH_CHECK_VALUE(mean_in.numel() == d.B * d.T && rstd_in.numel() == d.B * d.T, "mean/rstd do not match");
  for (auto [t, name, n] : {std::tuple{&shift, "shift", d.B * d.D}, std::tuple{&scale, "scale", d.B * d.D},
                            std::tuple{&weight, "weight", d.D}, std::tuple{&bias, "bias", d.D}})
    TORCH_CHECK_VALUE(!t->has_value() || (*t)->numel() == n, flowfm::msg(name, " has the wrong size"));
  if (new_res_in.scalar_type() == at::kHalf) {  // see half_via_float
    auto f = [](const at::Tensor& t) { return t.to(at::kFloat); };
    auto grads = fused_backward_cpu(dnew_res_in.has_value() ? c10::optional<at::Tensor>(f(*dnew_res_in)) : c10::nullopt,
                                    f(dy_in), f(new_res_in), f(h_in), gate_in, mean_in, rstd_in, shift, scale, weight,
                                    bias, kind_s, act_s);
    std::get<0>(grads) = std::get<0>(grads).to(at::kHalf);
    std::get<1>(grads) = std::get<1>(grads).to(at::kHalf);
    return grads;
  }
  const auto st = new_res_in.scalar_type();
  const auto acc = acc_dtype(st);
  auto new_res = new_res_in.contiguous();
  auto dy = dy_in.to(st).contiguous();
  auto h = h_in.to(st).contiguous();
  auto dnew_res = dnew_res_in.has_value() ? dnew_res_in->to(st).contiguous() : at::Tensor();
  auto gate = gate_in.to(acc).contiguous();
  auto mean = mean_in.to(acc).contiguous(), rstd = rstd_in.to(acc).contiguous();
  auto sh = small_acc(shift, acc), sc = small_acc(scale, acc), w = small_acc(weight, acc), bi = small_acc(bias, acc);
  auto fopt = new_res.options().dtype(acc);
  auto dres = at::empty_like(new_res), dh = at::empty_like(new_res);
  auto dgate = at::empty({d.B, d.D}, fopt);
  auto dshift = shift.has_value() ? at::empty({d.B, d.D}, fopt) : at::Tensor();
  auto dscale = scale.has_value() ? at::empty({d.B, d.D}, fopt) : at::Tensor();
  const int64_t nblk = num_blocks(d.B);
  auto dw_part = at::empty({nblk, d.D}, fopt), db_part = at::empty({nblk, d.D}, fopt);
  auto dw = at::empty({d.D}, fopt), db = at::empty({d.D}, fopt);
  FLOWFM_DISPATCH_FLOATS(st, "gated_residual_norm_modulate_backward", [&] {
    using A = acc_t<scalar_t>;
    dispatch_act(act, [&]<Act ACT>() {
      fused_backward<scalar_t, ACT>(
          dnew_res.defined() ? dnew_res.data_ptr<scalar_t>() : nullptr, dy.data_ptr<scalar_t>(),
          new_res.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), gate.data_ptr<A>(), mean.data_ptr<A>(),
          rstd.data_ptr<A>(), dres.data_ptr<scalar_t>(), dh.data_ptr<scalar_t>(), dgate.data_ptr<A>(), d,
          kind == Kind::Rms, ptr_or_null<A>(sh), ptr_or_null<A>(sc), ptr_or_null<A>(w), ptr_or_null<A>(bi),
          mut_ptr_or_null<A>(dshift), mut_ptr_or_null<A>(dscale), dw_part.data_ptr<A>(), db_part.data_ptr<A>(), nblk);
      sum_partials<A>(dw_part.data_ptr<A>(), nblk, d.D, dw.data_ptr<A>());
      sum_partials<A>(db_part.data_ptr<A>(), nblk, d.D, db.data_ptr<A>());
    });
  });
  auto cast = [](const at::Tensor& g, const c10::optional<at::Tensor>& like) {
    return like.has_value() ? g.to(like->scalar_type()) : empty_grad();
  };
  return {dres, dh.to(h_in.scalar_type()), dgate.to(gate_in.scalar_type()), cast(dshift, shift), cast(dscale, scale),
          cast(dw, weight), cast(db, bias)};
}
