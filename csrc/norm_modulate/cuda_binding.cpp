// CUDA kernels of flowfm::norm_modulate / norm_modulate_backward (schemas in csrc/ops.cpp), with
// the return conventions of the CPU kernels (csrc/cpu/norm_modulate.cpp):
//   forward:  y in x's dtype; mean/rstd fp32 (float64 for float64), (B * T) for layer/rms,
//             (B, G) for group;
//   backward: dx in x's dtype; dshift/dscale/dweight/dbias in their input's dtype, each an empty
//             tensor when that input is absent.
#include "../common/cuda_binding.h"
#include "cuda.h"

#include <vector>

namespace flowfm::cuda::binding {
namespace {

struct Shape { int64_t B, T, D; };  // tokens; group uses B, C = T, L = D

Shape shape_of(const at::Tensor& x, Kind kind) {
  if (kind == Kind::Group || x.dim() == 3) return {x.size(0), x.size(1), x.size(2)};
  return {x.size(0), 1, x.size(1)};
}

void check_inputs(const at::Tensor& x, const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& scale,
                  const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, Kind kind,
                  int64_t num_groups) {
  const auto dev = x.device();
  check_cuda_float(x, "x", dev);
  if (kind == Kind::Group) {
    TORCH_CHECK_VALUE(x.dim() == 3, "x must be (B, C, L) for kind='group'");
    TORCH_CHECK_VALUE(num_groups > 0 && x.size(1) % num_groups == 0, "num_groups must divide C");
    TORCH_CHECK_VALUE(x.size(0) * num_groups < (int64_t{1} << 31), "x too large for the cuda backend");
  } else {
    TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3, "x must be (B, T, D) or (N, D)");
  }
  const int64_t feat = kind == Kind::Group ? x.size(1) : x.size(-1);
  for (auto [t, name] : {std::pair{&shift, "shift"}, std::pair{&scale, "scale"}}) {
    if (t->has_value()) {
      check_cuda_float(**t, name, dev);
      check_shape(**t, {x.size(0), feat}, name);
    }
  }
  for (auto [t, name] : {std::pair{&weight, "weight"}, std::pair{&bias, "bias"}}) {
    if (t->has_value()) {
      check_cuda_float(**t, name, dev);
      check_shape(**t, {feat}, name);
    }
  }
}

template <typename A> Modulation<A> modulation(const std::vector<at::Tensor>& m) {
  return {cptr_or_null<A>(m[0]), cptr_or_null<A>(m[1]), cptr_or_null<A>(m[2]), cptr_or_null<A>(m[3])};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_modulate_cuda(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, c10::string_view kind_s,
    double eps, c10::string_view act_s, int64_t num_groups) {
  const Kind kind = parse_kind(kind_s);
  const Act act = parse_act(act_s);
  check_inputs(x_in, shift, scale, weight, bias, kind, num_groups);
  TORCH_CHECK_VALUE(eps > 0, "eps must be > 0");
  const c10::cuda::CUDAGuard guard(x_in.device());
  auto x = x_in.contiguous();
  const Shape s = shape_of(x, kind);
  const auto acc = acc_dtype(x.scalar_type());
  const std::vector<at::Tensor> mods{small_acc(shift, acc), small_acc(scale, acc), small_acc(weight, acc),
                                     small_acc(bias, acc)};
  auto y = at::empty_like(x);
  auto stats_shape = kind == Kind::Group ? std::vector<int64_t>{s.B, num_groups} : std::vector<int64_t>{s.B * s.T};
  auto mean = at::empty(stats_shape, x.options().dtype(acc));
  auto rstd = at::empty(stats_shape, x.options().dtype(acc));
  dispatch_storage(x.scalar_type(), "norm_modulate", [&](auto tag) {
    using S = typename decltype(tag)::type;
    using A = Acc<S>;
    if (kind == Kind::Group)
      norm_modulate_group_forward<S>(cptr<S>(x), ptr<S>(y), ptr<A>(mean), ptr<A>(rstd), s.B, s.T, s.D, num_groups,
                                     eps, act, modulation<A>(mods), current_stream());
    else
      norm_modulate_tokens_forward<S>(cptr<S>(x), ptr<S>(y), ptr<A>(mean), ptr<A>(rstd), s.B, s.T, s.D,
                                      kind == Kind::Rms, eps, act, modulation<A>(mods), current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_modulate_backward_cuda(
    const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& mean_in, const at::Tensor& rstd_in,
    const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, c10::string_view kind_s,
    c10::string_view act_s, int64_t num_groups) {
  const Kind kind = parse_kind(kind_s);
  const Act act = parse_act(act_s);
  check_inputs(x_in, shift, scale, weight, bias, kind, num_groups);
  const auto dev = x_in.device();
  check_cuda_float(dy_in, "dy", dev);
  check_shape(dy_in, x_in.sizes(), "dy");
  check_cuda_float(mean_in, "mean", dev);
  check_cuda_float(rstd_in, "rstd", dev);
  const c10::cuda::CUDAGuard guard(dev);
  auto x = x_in.contiguous();
  auto dy = dy_in.to(x.scalar_type()).contiguous();
  const Shape s = shape_of(x, kind);
  const auto acc = acc_dtype(x.scalar_type());
  const int64_t stats_numel = kind == Kind::Group ? s.B * num_groups : s.B * s.T;
  TORCH_CHECK_VALUE(mean_in.numel() == stats_numel && rstd_in.numel() == stats_numel, "mean/rstd do not match x");
  auto mean = mean_in.to(acc).contiguous();
  auto rstd = rstd_in.to(acc).contiguous();
  const std::vector<at::Tensor> mods{small_acc(shift, acc), small_acc(scale, acc), small_acc(weight, acc),
                                     small_acc(bias, acc)};
  const int64_t feat = kind == Kind::Group ? s.T : s.D;
  auto fopt = x.options().dtype(acc);
  auto dx = at::empty_like(x);
  auto dshift = shift.has_value() ? at::empty({s.B, feat}, fopt) : at::Tensor();
  auto dscale = scale.has_value() ? at::empty({s.B, feat}, fopt) : at::Tensor();
  auto dw = weight.has_value() ? at::empty({feat}, fopt) : at::Tensor();
  auto db = bias.has_value() ? at::empty({feat}, fopt) : at::Tensor();
  const int64_t parts = norm_modulate_partials(kind == Kind::Group, s.B);
  auto dw_part = dw.defined() ? at::empty({parts, feat}, fopt) : at::Tensor();
  auto db_part = db.defined() ? at::empty({parts, feat}, fopt) : at::Tensor();
  dispatch_storage(x.scalar_type(), "norm_modulate_backward", [&](auto tag) {
    using S = typename decltype(tag)::type;
    using A = Acc<S>;
    const ModulationGrads<A> grads{ptr_or_null<A>(dshift), ptr_or_null<A>(dscale), ptr_or_null<A>(dw),
                                   ptr_or_null<A>(db)};
    if (kind == Kind::Group)
      norm_modulate_group_backward<S>(cptr<S>(dy), cptr<S>(x), cptr<A>(mean), cptr<A>(rstd), ptr<S>(dx), s.B, s.T,
                                      s.D, num_groups, act, modulation<A>(mods), grads, ptr_or_null<A>(dw_part),
                                      ptr_or_null<A>(db_part), current_stream());
    else
      norm_modulate_tokens_backward<S>(cptr<S>(dy), cptr<S>(x), cptr<A>(mean), cptr<A>(rstd), ptr<S>(dx), s.B, s.T,
                                       s.D, kind == Kind::Rms, act, modulation<A>(mods), grads,
                                       ptr_or_null<A>(dw_part), ptr_or_null<A>(db_part), current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  auto cast = [&](const at::Tensor& g, const c10::optional<at::Tensor>& like) {
    return like.has_value() ? g.to(like->scalar_type()) : at::empty({0}, x.options());
  };
  return {dx, cast(dshift, shift), cast(dscale, scale), cast(dw, weight), cast(db, bias)};
}

}  // namespace

TORCH_LIBRARY_IMPL(flowfm, CUDA, m) {
  m.impl("norm_modulate", &norm_modulate_cuda);
  m.impl("norm_modulate_backward", &norm_modulate_backward_cuda);
}

}  // namespace flowfm::cuda::binding
