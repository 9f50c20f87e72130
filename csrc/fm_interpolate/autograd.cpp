// Autograd of flowfm::fm_interpolate in C++, for every device's kernel (the Triton op keeps its
// Python formula in flowfm_fast/ops/fm_interpolate.py, which this mirrors). The backward is one call
// of flowfm::fm_interpolate_backward; an unused output's gradient stays absent.
#include "../common/autograd.h"

#include <optional>
#include <tuple>

namespace flowfm {
namespace {

using Pair = std::tuple<at::Tensor, at::Tensor>;
using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

class FmInterpolate : public torch::autograd::Function<FmInterpolate> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x0, const at::Tensor& x1, const at::Tensor& t,
                               double sigma_min) {
    static auto op = op_handle<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>("flowfm::fm_interpolate");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [x_t, u_t] = op.call(x0, x1, t, sigma_min);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x0, x1, t});
    ctx->saved_data["sigma_min"] = sigma_min;
    return {x_t, u_t};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<Triple(const OptT&, const OptT&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, double)>("flowfm::fm_interpolate_backward");
    const auto s = ctx->get_saved_variables();
    first_order_only("flowfm::fm_interpolate", grads, s);
    if (!grads[0].defined() && !grads[1].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    auto [dx0, dx1, dt] = op.call(opt(grads[0]), opt(grads[1]), s[0], s[1], s[2],
                                  ctx->saved_data["sigma_min"].toDouble());
    return {ctx->needs_input_grad(0) ? dx0 : at::Tensor(), ctx->needs_input_grad(1) ? dx1 : at::Tensor(),
            ctx->needs_input_grad(2) ? dt : at::Tensor(), at::Tensor()};
  }
};

Pair fm_interpolate_autograd(const at::Tensor& x0, const at::Tensor& x1, const at::Tensor& t, double sigma_min) {
  auto out = FmInterpolate::apply(x0, x1, t, sigma_min);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(flowfm, Autograd, m) { m.impl("fm_interpolate", &fm_interpolate_autograd); }

}  // namespace flowfm
