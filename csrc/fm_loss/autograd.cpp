// Autograd of flowfm::fm_loss in C++, for every device's kernel (CPU here, CUDA in
// csrc/cuda/fm_loss_binding.cpp; the Triton op keeps its Python formula, flowfm_fast/ops/fm_loss.py).
//
// Why C++: the kernel of a (256, 3, 300) loss takes ~27 us on the 2-core CPU, while the Python
// autograd path (torch.library.register_autograd: a generated autograd.Function, argument filling,
// setup_context, a Python backward) added ~50 us a call. The formula is the one of
// flowfm_fast/ops/fm_loss.py: the forward already wrote dv = dloss/dv for dloss = 1, so the backward
// only scales it (u_t is never formed), and d/dw_b = per_sample_b / B.
#include "../common/autograd.h"

#include <optional>
#include <tuple>

namespace flowfm {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Outputs call_fm_loss(const at::Tensor& v, const at::Tensor& x0, const at::Tensor& x1,
                     const std::optional<at::Tensor>& weight, double sigma_min, bool need_grad) {
  static auto op = op_handle<Outputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const std::optional<at::Tensor>&, double, bool)>("flowfm::fm_loss");
  return op.call(v, x0, x1, weight, sigma_min, need_grad);
}

class FmLoss : public torch::autograd::Function<FmLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& v, const at::Tensor& x0,
                               const at::Tensor& x1, const std::optional<at::Tensor>& weight,
                               double sigma_min, bool need_grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, per_sample, dv] = call_fm_loss(v, x0, x1, weight, sigma_min, need_grad);
    ctx->mark_non_differentiable({per_sample, dv});
    ctx->set_materialize_grads(false);  // no zero-filled (B, C, L) "gradient" of dv each backward
    ctx->save_for_backward({dv, per_sample, weight.has_value() ? *weight : at::Tensor()});
    ctx->saved_data["sigma_min"] = sigma_min;
    ctx->saved_data["v_dtype"] = static_cast<int64_t>(v.scalar_type());
    ctx->saved_data["x0_dtype"] = static_cast<int64_t>(x0.scalar_type());
    ctx->saved_data["x1_dtype"] = static_cast<int64_t>(x1.scalar_type());
    return {loss, per_sample, dv};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    first_order_only("flowfm::fm_loss", grads, saved);
    const at::Tensor &dv = saved[0], &per_sample = saved[1], &weight = saved[2];
    const at::Tensor& dloss = grads[0];
    if (!dloss.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    auto dtype = [&](const char* key) { return static_cast<at::ScalarType>(ctx->saved_data[key].toInt()); };
    // Edges exist for the tensor inputs only: v, x0, x1, and weight when one was given.
    const bool need_v = ctx->needs_input_grad(0), need_x0 = ctx->needs_input_grad(1),
               need_x1 = ctx->needs_input_grad(2), need_w = weight.defined() && ctx->needs_input_grad(3);
    TORCH_CHECK((!need_v && !need_x0 && !need_x1) || dv.numel() > 0,
                "fm_loss: backward needs dv, but the forward ran with need_grad=False");
    at::Tensor g_v, g_x0, g_x1, g_w;
    if (need_v || need_x0 || need_x1) {
      const at::Tensor g = dv * dloss;
      if (need_v) g_v = g.to(dtype("v_dtype"));
      if (need_x0) g_x0 = (g * (1.0 - ctx->saved_data["sigma_min"].toDouble())).to(dtype("x0_dtype"));
      if (need_x1) g_x1 = g.neg().to(dtype("x1_dtype"));
    }
    if (need_w) g_w = (per_sample * dloss / per_sample.size(0)).to(weight.scalar_type());
    return {g_v, g_x0, g_x1, g_w, at::Tensor(), at::Tensor()};
  }
};

Outputs fm_loss_autograd(const at::Tensor& v, const at::Tensor& x0, const at::Tensor& x1,
                         const std::optional<at::Tensor>& weight, double sigma_min, bool need_grad) {
  auto out = FmLoss::apply(v, x0, x1, weight, sigma_min, need_grad);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(flowfm, Autograd, m) { m.impl("fm_loss", &fm_loss_autograd); }

}  // namespace flowfm
