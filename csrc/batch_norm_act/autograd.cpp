// Autograd of flowfm::batch_norm_act in C++ (CPU kernel: csrc/cpu/batch_norm_act.cpp). The forward
// saves x and the statistics that normalised it; the backward is one call of
// flowfm::batch_norm_act_backward. The running statistics take no gradient.
#include "../common/autograd.h"

#include <string>
#include <tuple>

namespace flowfm {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

class BatchNormAct : public torch::autograd::Function<BatchNormAct> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptT& weight, const OptT& bias,
                               const OptT& running_mean, const OptT& running_var, bool training, double eps,
                               c10::string_view act) {
    static auto op = op_handle<Outputs(const at::Tensor&, const OptT&, const OptT&, const OptT&, const OptT&, bool,
                                       double, c10::string_view)>("flowfm::batch_norm_act");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, mean, rstd, var_unbiased] = op.call(x, weight, bias, running_mean, running_var, training, eps, act);
    ctx->mark_non_differentiable({mean, rstd, var_unbiased});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, mean, rstd, or_undefined(weight), or_undefined(bias)});
    ctx->saved_data["training"] = training;
    ctx->saved_data["act"] = std::string(act);
    return {y, mean, rstd, var_unbiased};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const OptT&, const OptT&, bool, c10::string_view, bool)>(
        "flowfm::batch_norm_act_backward");
    const auto s = ctx->get_saved_variables();
    first_order_only("flowfm::batch_norm_act", grads, s);
    const at::Tensor none;
    if (!grads[0].defined()) return {none, none, none, none, none, none, none, none};
    // Edges exist for x and for each optional tensor that was given, in argument order.
    const bool need_x = ctx->needs_input_grad(0);
    size_t edge = 1;
    const bool need_w = s[3].defined() && ctx->needs_input_grad(edge++);
    const bool need_b = s[4].defined() && ctx->needs_input_grad(edge++);
    if (!need_x && !need_w && !need_b) return {none, none, none, none, none, none, none, none};
    auto [dx, dweight, dbias] = op.call(grads[0], s[0], s[1], s[2], opt(s[3]), opt(s[4]),
                                        ctx->saved_data["training"].toBool(), ctx->saved_data["act"].toStringRef(),
                                        need_x);
    return {need_x ? dx : none, need_w ? dweight : none, need_b ? dbias : none, none, none, none, none, none};
  }
};

Outputs batch_norm_act_autograd(const at::Tensor& x, const OptT& weight, const OptT& bias, const OptT& running_mean,
                                const OptT& running_var, bool training, double eps, c10::string_view act) {
  auto out = BatchNormAct::apply(x, weight, bias, running_mean, running_var, training, eps, act);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(flowfm, Autograd, m) { m.impl("batch_norm_act", &batch_norm_act_autograd); }

}  // namespace flowfm
