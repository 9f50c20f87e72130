// The norm_modulate CPU kernels and their torch-facing functions, compiled once per CPU capability
// (included by cpu.cpp through common/cpu_variants.h: no include guard, no torch includes here).
#include "../common/cpu_norm_rows.h"

struct Shape { int64_t B, T, D; };  // tokens; group uses B, C = T, L = D

template <typename A> struct Mods {
  at::Tensor shift, scale, w, bias;  // accumulation dtype, contiguous, or undefined
};

template <typename A>
Mods<A> load_mods(const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& scale,
                  const c10::optional<at::Tensor>& w, const c10::optional<at::Tensor>& bias) {
  const auto acc = c10::CppTypeToScalarType<A>::value;
  return {small_acc(shift, acc), small_acc(scale, acc), small_acc(w, acc), small_acc(bias, acc)};
}

// ------------------------------------------------------------------------------ token kinds

template <typename S, Act ACT>
void token_forward(const S* x, S* y, acc_t<S>* mean, acc_t<S>* rstd, Shape s, bool rms, acc_t<S> eps,
                   const Mods<acc_t<S>>& m) {
  using A = acc_t<S>;
  const TokenMods<A> mods(ptr_or_null<A>(m.shift), ptr_or_null<A>(m.scale), ptr_or_null<A>(m.w),
                          ptr_or_null<A>(m.bias), s.D);
  at::parallel_for(0, s.B * s.T, grain_rows(s.D), [&](int64_t begin, int64_t end) {
    SampleFold<A> fold(s.D);
    const A* alpha = fold.alpha.data();
    const A* beta = fold.beta.data();
    std::vector<float> wide(std::is_same_v<S, c10::BFloat16> ? s.D : 0);
    std::vector<A> scratch(s.D);
    // Rows are read in place (converted per element); a row of D values stays in L1 for the
    // three passes (mean, variance, output).
    for (int64_t row = begin; row < end; ++row) {
      fold.at(mods, row / s.T);
      const S* xr = x + row * s.D;
      if constexpr (std::is_same_v<S, c10::BFloat16>) {  // widened once, then the fp32 row kernels
        widen_row<S>(xr, wide.data(), s.D);
        row_stats<A, float>(wide.data(), s.D, rms, eps, mean[row], rstd[row]);
        row_forward<ACT, A, float, S>(wide.data(), y + row * s.D, s.D, mean[row], rstd[row], alpha, beta,
                                       scratch.data());
      } else {
        row_stats<A, S>(xr, s.D, rms, eps, mean[row], rstd[row]);
        row_forward<ACT, A, S, S>(xr, y + row * s.D, s.D, mean[row], rstd[row], alpha, beta, scratch.data());
      }
    }
  });
}

template <typename S, Act ACT>
void token_backward(const S* dy, const S* x, const acc_t<S>* mean, const acc_t<S>* rstd, S* dx, Shape s, bool rms,
                    const Mods<acc_t<S>>& m, acc_t<S>* dshift, acc_t<S>* dscale, acc_t<S>* dw_part, acc_t<S>* db_part,
                    int64_t nblk) {
  using A = acc_t<S>;
  const TokenMods<A> mods(ptr_or_null<A>(m.shift), ptr_or_null<A>(m.scale), ptr_or_null<A>(m.w),
                          ptr_or_null<A>(m.bias), s.D);
  at::parallel_for(0, nblk, 1, [&](int64_t blk_begin, int64_t blk_end) {
    std::vector<A> scratch(s.D), s0(s.D), s1(s.D), dsh_scratch(s.D), dsc_scratch(s.D);
    SampleFold<A> fold(s.D);
    for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
      A* dwp = dw_part + blk * s.D;
      A* dbp = db_part + blk * s.D;
      std::fill(dwp, dwp + s.D, A(0));
      std::fill(dbp, dbp + s.D, A(0));
      for (int64_t b = block_begin(blk, nblk, s.B); b < block_begin(blk + 1, nblk, s.B); ++b) {
        std::fill(s0.begin(), s0.end(), A(0));
        std::fill(s1.begin(), s1.end(), A(0));
        const RowParams<A> p = mods.of(b);
        fold.at(mods, b);
        const RowSums<A> g{s0.data(), s1.data()};
        for (int64_t t = 0; t < s.T; ++t) {
          const int64_t o = (b * s.T + t) * s.D;
          row_backward<ACT, A, S, S, S>(x + o, dy + o, scratch.data(), dx + o, s.D, rms, mean[b * s.T + t],
                                         rstd[b * s.T + t], fold.alpha.data(), fold.beta.data(), g);
        }
        finish_sample<A>(s0.data(), s1.data(), p, dshift ? dshift + b * s.D : dsh_scratch.data(),
                         dscale ? dscale + b * s.D : dsc_scratch.data(), dwp, dbp, s.D);
      }
    }
  });
}

// ------------------------------------------------------------------------------ GroupNorm

template <typename S, Act ACT>
void group_forward(const S* x, S* y, acc_t<S>* mean, acc_t<S>* rstd, Shape s, int64_t G, acc_t<S> eps,
                   const Mods<acc_t<S>>& m) {
  using A = acc_t<S>;
  const int64_t C = s.T, L = s.D, Cg = C / G, n = Cg * L;
  const A* sh = ptr_or_null<A>(m.shift);
  const A* sc = ptr_or_null<A>(m.scale);
  const A* w = ptr_or_null<A>(m.w);
  const A* bi = ptr_or_null<A>(m.bias);
  at::parallel_for(0, s.B * G, grain_rows(n), [&](int64_t begin, int64_t end) {
    std::vector<A> scratch(std::is_same_v<S, A> ? 0 : L);  // u of one channel for a bf16/fp16 y
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / G, g = bg % G;
      const S* xg = x + bg * n;
      A sum = A(0);
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < n; ++i) sum += static_cast<A>(xg[i]);
      const A mu = sum / A(n);
      A var = A(0);
#pragma omp simd reduction(+ : var)
      for (int64_t i = 0; i < n; ++i) var += (static_cast<A>(xg[i]) - mu) * (static_cast<A>(xg[i]) - mu);
      const A r = A(1) / std::sqrt(var / A(n) + eps);
      mean[bg] = mu;
      rstd[bg] = r;
      for (int64_t cl = 0; cl < Cg; ++cl) {
        const int64_t c = g * Cg + cl;
        const A one_plus = A(1) + (sc ? sc[b * C + c] : A(0));
        const A wc = w ? w[c] : A(1), bc = bi ? bi[c] : A(0);
        // u = x * alpha + beta folds normalisation, affine and modulation into one FMA per element.
        const A alpha = r * wc * one_plus;
        const A beta = (bc - mu * r * wc) * one_plus + (sh ? sh[b * C + c] : A(0));
        const S* xc = xg + cl * L;
        S* yc = y + bg * n + cl * L;
        act_store<ACT>(yc, scratch.data(), L, [&](int64_t l) { return static_cast<A>(xc[l]) * alpha + beta; });
      }
    }
  });
}

template <typename S, Act ACT>
void group_backward(const S* dy, const S* x, const acc_t<S>* mean, const acc_t<S>* rstd, S* dx, Shape s, int64_t G,
                    const Mods<acc_t<S>>& m, acc_t<S>* dshift, acc_t<S>* dscale, acc_t<S>* dw_part, acc_t<S>* db_part,
                    int64_t nblk) {
  using A = acc_t<S>;
  const int64_t C = s.T, L = s.D, Cg = C / G, n = Cg * L;
  const A* sh = ptr_or_null<A>(m.shift);
  const A* sc = ptr_or_null<A>(m.scale);
  const A* w = ptr_or_null<A>(m.w);
  const A* bi = ptr_or_null<A>(m.bias);
  at::parallel_for(0, nblk, 1, [&](int64_t blk_begin, int64_t blk_end) {
    std::vector<A> gu(n);  // dL/du of one group, reused by the dx pass
    for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
      A* dwp = dw_part + blk * C;
      A* dbp = db_part + blk * C;
      std::fill(dwp, dwp + C, A(0));
      std::fill(dbp, dbp + C, A(0));
      for (int64_t b = block_begin(blk, nblk, s.B); b < block_begin(blk + 1, nblk, s.B); ++b) {
        for (int64_t g = 0; g < G; ++g) {
          const int64_t bg = b * G + g;
          const A mu = mean[bg], r = rstd[bg];
          const S* xg = x + bg * n;
          const S* dyg = dy + bg * n;
          A sum1 = A(0), sum2 = A(0);  // sums of dxhat and dxhat * xhat over the group
          for (int64_t cl = 0; cl < Cg; ++cl) {
            const int64_t c = g * Cg + cl;
            const A one_plus = A(1) + (sc ? sc[b * C + c] : A(0));
            const A wc = w ? w[c] : A(1), bc = bi ? bi[c] : A(0);
            const A shc = sh ? sh[b * C + c] : A(0);
            const S* xc = xg + cl * L;
            const S* dyc = dyg + cl * L;
            A* guc = gu.data() + cl * L;
            A s_g = A(0), s_gx = A(0);
            constexpr bool kActRow = ACT != Act::None && std::is_same_v<A, float>;
            if constexpr (kActRow) {  // act'(u) of the channel first (act_inplace), as row_backward
#pragma omp simd
              for (int64_t l = 0; l < L; ++l) guc[l] = ((static_cast<A>(xc[l]) - mu) * r * wc + bc) * one_plus + shc;
              act_inplace<ACT, true>(guc, L);
            }
#pragma omp simd reduction(+ : s_g, s_gx)
            for (int64_t l = 0; l < L; ++l) {
              const A xhat = (static_cast<A>(xc[l]) - mu) * r;
              A gv = static_cast<A>(dyc[l]);
              if constexpr (kActRow) gv *= guc[l];
              else if constexpr (ACT != Act::None) gv *= act_grad<A>(ACT, (xhat * wc + bc) * one_plus + shc);
              guc[l] = gv;
              s_g += gv;
              s_gx += gv * xhat;
            }
            if (dshift) dshift[b * C + c] = s_g;
            if (dscale) dscale[b * C + c] = wc * s_gx + bc * s_g;
            dwp[c] += one_plus * s_gx;
            dbp[c] += one_plus * s_g;
            sum1 += one_plus * wc * s_g;
            sum2 += one_plus * wc * s_gx;
          }
          const A c1 = sum1 / A(n), c2 = sum2 / A(n);
          for (int64_t cl = 0; cl < Cg; ++cl) {
            const int64_t c = g * Cg + cl;
            const A k = (A(1) + (sc ? sc[b * C + c] : A(0))) * (w ? w[c] : A(1));
            const S* xc = xg + cl * L;
            const A* guc = gu.data() + cl * L;
            S* dxc = dx + bg * n + cl * L;
#pragma omp simd
            for (int64_t l = 0; l < L; ++l) {
              const A xhat = (static_cast<A>(xc[l]) - mu) * r;
              dxc[l] = to_storage<S>(r * (guc[l] * k - c1 - xhat * c2));
            }
          }
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------ ops

Shape shape_of(const at::Tensor& x, Kind kind) {
  if (kind == Kind::Group || x.dim() == 3) return {x.size(0), x.size(1), x.size(2)};
  return {x.size(0), 1, x.size(1)};
}

void check_inputs(const at::Tensor& x, const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& scale,
                  const c10::optional<at::Tensor>& w, const c10::optional<at::Tensor>& bias, Kind kind,
                  int64_t num_groups) {
  check_cpu_float(x, "x");
  if (kind == Kind::Group) {
    TORCH_CHECK_VALUE(x.dim() == 3, "x must be (B, C, L) for kind='group'");
    TORCH_CHECK_VALUE(num_groups > 0 && x.size(1) % num_groups == 0, "num_groups must divide C");
  } else {
    TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3, "x must be (B, T, D) or (N, D)");
  }
  const int64_t feat = kind == Kind::Group ? x.size(1) : x.size(-1);
  for (auto [t, name] : {std::pair{&shift, "shift"}, std::pair{&scale, "scale"}}) {
    if (t->has_value()) {
      check_cpu_float(**t, name);
      check_shape(**t, {x.size(0), feat}, name);
    }
  }
  for (auto [t, name] : {std::pair{&w, "weight"}, std::pair{&bias, "bias"}}) {
    if (t->has_value()) {
      check_cpu_float(**t, name);
      check_shape(**t, {feat}, name);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_modulate_cpu(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, c10::string_view kind_s,
    double eps, c10::string_view act_s, int64_t num_groups) {
  const Kind kind = parse_kind(kind_s);
  const Act act = parse_act(act_s);
  check_inputs(x_in, shift, scale, weight, bias, kind, num_groups);
  TORCH_CHECK_VALUE(eps > 0, "eps must be > 0");
  if (x_in.scalar_type() == at::kHalf) {
    // fp16 runs the fp32 kernel on a converted copy: c10::Half loads and stores do not vectorise
    // (GCC 12 without AVX512-FP16), which made the fp16 kernels ~10x slower than fp32, while ATen's
    // conversions are vectorised. The same arithmetic and one rounding of y, as before.
    auto [y, mean, rstd] = norm_modulate_cpu(x_in.to(at::kFloat), shift, scale, weight, bias, kind_s, eps, act_s,
                                             num_groups);
    return {y.to(at::kHalf), mean, rstd};
  }
  auto x = x_in.contiguous();
  const Shape s = shape_of(x, kind);
  const auto acc = acc_dtype(x.scalar_type());
  auto y = at::empty_like(x);
  auto stats_shape = kind == Kind::Group ? std::vector<int64_t>{s.B, num_groups} : std::vector<int64_t>{s.B * s.T};
  auto mean = at::empty(stats_shape, x.options().dtype(acc));
  auto rstd = at::empty(stats_shape, x.options().dtype(acc));
  FLOWFM_DISPATCH_FLOATS(x.scalar_type(), "norm_modulate", [&] {
    using A = acc_t<scalar_t>;
    auto m = load_mods<A>(shift, scale, weight, bias);
    dispatch_act(act, [&]<Act ACT>() {
      if (kind == Kind::Group)
        group_forward<scalar_t, ACT>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), mean.data_ptr<A>(),
                                     rstd.data_ptr<A>(), s, num_groups, static_cast<A>(eps), m);
      else
        token_forward<scalar_t, ACT>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), mean.data_ptr<A>(),
                                     rstd.data_ptr<A>(), s, kind == Kind::Rms, static_cast<A>(eps), m);
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_modulate_backward_cpu(
    const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& mean_in, const at::Tensor& rstd_in,
    const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, c10::string_view kind_s,
    c10::string_view act_s, int64_t num_groups) {
  const Kind kind = parse_kind(kind_s);
  const Act act = parse_act(act_s);
  check_inputs(x_in, shift, scale, weight, bias, kind, num_groups);
  check_cpu_float(dy_in, "dy");
  check_shape(dy_in, x_in.sizes(), "dy");
  if (x_in.scalar_type() == at::kHalf) {  // as in the forward: the fp32 kernel on converted copies
    auto grads = norm_modulate_backward_cpu(dy_in.to(at::kFloat), x_in.to(at::kFloat), mean_in, rstd_in, shift,
                                            scale, weight, bias, kind_s, act_s, num_groups);
    std::get<0>(grads) = std::get<0>(grads).to(at::kHalf);
    return grads;
  }
  auto x = x_in.contiguous();
  auto dy = dy_in.to(x.scalar_type()).contiguous();
  const Shape s = shape_of(x, kind);
  const auto acc = acc_dtype(x.scalar_type());
  const int64_t stats_numel = kind == Kind::Group ? s.B * num_groups : s.B * s.T;
  TORCH_CHECK_VALUE(mean_in.numel() == stats_numel && rstd_in.numel() == stats_numel, "mean/rstd do not match x");
  auto mean = mean_in.to(acc).contiguous();
  auto rstd = rstd_in.to(acc).contiguous();
  const int64_t feat = kind == Kind::Group ? s.T : s.D;
  auto dx = at::empty_like(x);
  auto fopt = x.options().dtype(acc);
  auto dshift = shift.has_value() ? at::empty({s.B, feat}, fopt) : at::Tensor();
  auto dscale = scale.has_value() ? at::empty({s.B, feat}, fopt) : at::Tensor();
  const int64_t nblk = num_blocks(s.B);
  auto dw_part = at::empty({nblk, feat}, fopt);
  auto db_part = at::empty({nblk, feat}, fopt);
  auto dw = at::empty({feat}, fopt);
  auto db = at::empty({feat}, fopt);
  FLOWFM_DISPATCH_FLOATS(x.scalar_type(), "norm_modulate_backward", [&] {
    using A = acc_t<scalar_t>;
    auto m = load_mods<A>(shift, scale, weight, bias);
    dispatch_act(act, [&]<Act ACT>() {
      if (kind == Kind::Group)
        group_backward<scalar_t, ACT>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), mean.data_ptr<A>(),
                                      rstd.data_ptr<A>(), dx.data_ptr<scalar_t>(), s, num_groups, m,
                                      mut_ptr_or_null<A>(dshift), mut_ptr_or_null<A>(dscale), dw_part.data_ptr<A>(),
                                      db_part.data_ptr<A>(), nblk);
      else
        token_backward<scalar_t, ACT>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), mean.data_ptr<A>(),
                                      rstd.data_ptr<A>(), dx.data_ptr<scalar_t>(), s, kind == Kind::Rms, m,
                                      mut_ptr_or_null<A>(dshift), mut_ptr_or_null<A>(dscale), dw_part.data_ptr<A>(),
                                      db_part.data_ptr<A>(), nblk);
      sum_partials<A>(dw_part.data_ptr<A>(), nblk, feat, dw.data_ptr<A>());
      sum_partials<A>(db_part.data_ptr<A>(), nblk, feat, db.data_ptr<A>());
    });
  });
  auto cast = [](const at::Tensor& g, const c10::optional<at::Tensor>& like) {
    return like.has_value() ? g.to(like->scalar_type()) : empty_grad();
  };
  return {dx, cast(dshift, shift), cast(dscale, scale), cast(dw, weight), cast(db, bias)};
}
