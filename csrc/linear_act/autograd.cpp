// Autograd of flowfm::linear_act in C++ (CPU kernel: csrc/cpu/linear_act.cpp). The forward saves x,
// W and the pre-activation u; the backward is one call of flowfm::linear_act_backward, which skips
// the GEMMs of gradients nobody asked for (a first layer's dx, a frozen weight's dW).
#include "../common/autograd.h"

#include <string>
#include <tuple>

namespace flowfm {
namespace {

using Pair = std::tuple<at::Tensor, at::Tensor>;
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

class LinearAct : public torch::autograd::Function<LinearAct> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, const OptT& bias,
                               c10::string_view act) {
    static auto op = op_handle<Pair(const at::Tensor&, const at::Tensor&, const OptT&, c10::string_view)>(
        "flowfm::linear_act");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, u] = op.call(x, weight, bias, act);
    ctx->mark_non_differentiable({u});
    // u never gets a gradient: without this autograd would hand the backward a zero-filled (M, N)
    // tensor for it every call (measured 0.7 ms at M = 1920, N = 512).
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, weight, u});
    ctx->saved_data["act"] = std::string(act);
    ctx->saved_data["has_bias"] = bias.has_value();
    return {y, u};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     c10::string_view, bool, bool, bool)>("flowfm::linear_act_backward");
    const auto s = ctx->get_saved_variables();
    first_order_only("flowfm::linear_act", grads, s);
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1),
               need_b = has_bias && ctx->needs_input_grad(2);
    auto [dx, dw, db] = op.call(grads[0], s[0], s[1], s[2], ctx->saved_data["act"].toStringRef(),
                                need_x, need_w, need_b);
    return {need_x ? dx : at::Tensor(), need_w ? dw : at::Tensor(), need_b ? db : at::Tensor(), at::Tensor()};
  }
};

Pair linear_act_autograd(const at::Tensor& x, const at::Tensor& weight, const OptT& bias, c10::string_view act) {
  auto out = LinearAct::apply(x, weight, bias, act);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(flowfm, Autograd, m) { m.impl("linear_act", &linear_act_autograd); }

}  // namespace flowfm
