// Autograd of flowfm::norm_modulate in C++, for every device's kernel (CPU: csrc/cpu, CUDA:
// csrc/cuda; the Triton op keeps its Python formula in flowfm_fast/ops/norm_modulate.py, which this
// mirrors). The forward saves x and the statistics; the backward is one call of
// flowfm::norm_modulate_backward. In C++ because the Python register_autograd path cost ~50 us of
// host time a call (see csrc/fm_loss_autograd.cpp), as much as a small layer's kernels.
#include "../common/autograd.h"

#include <optional>
#include <string>
#include <tuple>

namespace flowfm {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_forward(const at::Tensor& x, const OptT& shift, const OptT& scale,
                                                            const OptT& weight, const OptT& bias, c10::string_view kind,
                                                            double eps, c10::string_view act, int64_t num_groups) {
  static auto op = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const OptT&, const OptT&, const OptT&, const OptT&, c10::string_view,
                           double, c10::string_view, int64_t)>("flowfm::norm_modulate");
  return op.call(x, shift, scale, weight, bias, kind, eps, act, num_groups);
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Grads call_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
                    const OptT& shift, const OptT& scale, const OptT& weight, const OptT& bias,
                    c10::string_view kind, c10::string_view act, int64_t num_groups) {
  static auto op = op_handle<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const OptT&, const OptT&, const OptT&, const OptT&, c10::string_view,
                                    c10::string_view, int64_t)>("flowfm::norm_modulate_backward");
  return op.call(dy, x, mean, rstd, shift, scale, weight, bias, kind, act, num_groups);
}

class NormModulate : public torch::autograd::Function<NormModulate> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptT& shift, const OptT& scale,
                               const OptT& weight, const OptT& bias, c10::string_view kind, double eps,
                               c10::string_view act, int64_t num_groups) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, mean, rstd] = call_forward(x, shift, scale, weight, bias, kind, eps, act, num_groups);
    ctx->mark_non_differentiable({mean, rstd});
    ctx->save_for_backward({x, mean, rstd, or_undefined(shift), or_undefined(scale), or_undefined(weight),
                            or_undefined(bias)});
    ctx->saved_data["kind"] = std::string(kind);
    ctx->saved_data["act"] = std::string(act);
    ctx->saved_data["num_groups"] = num_groups;
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    first_order_only("flowfm::norm_modulate", grads, s);
    const auto kind = ctx->saved_data["kind"].toStringRef(), act = ctx->saved_data["act"].toStringRef();
    auto [dx, dshift, dscale, dweight, dbias] =
        call_backward(grads[0], s[0], s[1], s[2], opt(s[3]), opt(s[4]), opt(s[5]), opt(s[6]), kind, act,
                      ctx->saved_data["num_groups"].toInt());
    // Edges exist for x and for each optional tensor that was given, in argument order.
    size_t edge = 0;
    auto wanted = [&](const at::Tensor& input, const at::Tensor& grad) {
      if (!input.defined()) return at::Tensor();
      return ctx->needs_input_grad(edge++) && grad.numel() > 0 ? grad : at::Tensor();
    };
    at::Tensor gx = wanted(s[0], dx);
    at::Tensor gshift = wanted(s[3], dshift), gscale = wanted(s[4], dscale);
    at::Tensor gweight = wanted(s[5], dweight), gbias = wanted(s[6], dbias);
    return {gx, gshift, gscale, gweight, gbias, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_modulate_autograd(const at::Tensor& x, const OptT& shift,
                                                                      const OptT& scale, const OptT& weight,
                                                                      const OptT& bias, c10::string_view kind,
                                                                      double eps, c10::string_view act,
                                                                      int64_t num_groups) {
  auto out = NormModulate::apply(x, shift, scale, weight, bias, kind, eps, act, num_groups);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(flowfm, Autograd, m) { m.impl("norm_modulate", &norm_modulate_autograd); }

}  // namespace flowfm
