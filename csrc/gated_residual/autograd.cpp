// Autograd of flowfm::gated_residual and flowfm::gated_residual_norm_modulate in C++, for every
// device's kernel (the Triton ops keep their Python formulas in flowfm_fast/ops/gated_residual.py,
// which these mirror). In C++ because the Python register_autograd path cost ~50 us of host time a
// call (see csrc/fm_loss_autograd.cpp), as much as a small block's kernels.
#include "../common/autograd.h"

#include <optional>
#include <string>
#include <tuple>

namespace flowfm {
namespace {

// ------------------------------------------------------------------------- gated_residual
class GatedResidual : public torch::autograd::Function<GatedResidual> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& res, const at::Tensor& h,
                               const at::Tensor& gate) {
    static auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
        "flowfm::gated_residual");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({h, gate});
    ctx->saved_data["res_dtype"] = static_cast<int64_t>(res.scalar_type());
    return {op.call(res, h, gate)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&)>(
        "flowfm::gated_residual_backward");
    const auto s = ctx->get_saved_variables();
    first_order_only("flowfm::gated_residual", grads, s);
    const at::Tensor& dy = grads[0];
    at::Tensor dres, dh, dgate;
    if (ctx->needs_input_grad(1) || ctx->needs_input_grad(2)) std::tie(dh, dgate) = op.call(dy, s[0], s[1]);
    if (ctx->needs_input_grad(0)) dres = dy.to(static_cast<at::ScalarType>(ctx->saved_data["res_dtype"].toInt()));
    return {dres, ctx->needs_input_grad(1) ? dh : at::Tensor(), ctx->needs_input_grad(2) ? dgate : at::Tensor()};
  }
};

at::Tensor gated_residual_autograd(const at::Tensor& res, const at::Tensor& h, const at::Tensor& gate) {
  return GatedResidual::apply(res, h, gate)[0];
}

// --------------------------------------------------------- gated_residual_norm_modulate
using FusedOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using FusedGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

class GatedResidualNormModulate : public torch::autograd::Function<GatedResidualNormModulate> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& res, const at::Tensor& h,
                               const at::Tensor& gate, const OptT& shift, const OptT& scale, const OptT& weight,
                               const OptT& bias, c10::string_view kind, double eps, c10::string_view act) {
    static auto op = op_handle<FusedOut(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&,
                                        const OptT&, const OptT&, const OptT&, c10::string_view, double,
                                        c10::string_view)>("flowfm::gated_residual_norm_modulate");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [new_res, y, mean, rstd] = op.call(res, h, gate, shift, scale, weight, bias, kind, eps, act);
    ctx->mark_non_differentiable({mean, rstd});
    ctx->set_materialize_grads(false);  // an unused output's gradient stays absent (no zeros to read)
    ctx->save_for_backward({new_res, h, gate, mean, rstd, or_undefined(shift), or_undefined(scale),
                            or_undefined(weight), or_undefined(bias)});
    ctx->saved_data["kind"] = std::string(kind);
    ctx->saved_data["act"] = std::string(act);
    ctx->saved_data["res_dtype"] = static_cast<int64_t>(res.scalar_type());
    return {new_res, y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<FusedGrads(const OptT&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&,
                                          const OptT&, const OptT&, const OptT&, c10::string_view,
                                          c10::string_view)>("flowfm::gated_residual_norm_modulate_backward");
    const auto s = ctx->get_saved_variables();
    first_order_only("flowfm::gated_residual_norm_modulate", grads, s);
    const at::Tensor& new_res = s[0];
    const at::Tensor dy = grads[1].defined() ? grads[1] : at::zeros_like(new_res);
    auto [dres, dh, dgate, dshift, dscale, dweight, dbias] =
        op.call(opt(grads[0]), dy, new_res, s[1], s[2], s[3], s[4], opt(s[5]), opt(s[6]), opt(s[7]), opt(s[8]),
                ctx->saved_data["kind"].toStringRef(), ctx->saved_data["act"].toStringRef());
    // Edges: res, h, gate, then each optional tensor that was given, in argument order.
    size_t edge = 0;
    auto wanted = [&](bool present, const at::Tensor& grad) {
      if (!present) return at::Tensor();
      return ctx->needs_input_grad(edge++) && grad.numel() > 0 ? grad : at::Tensor();
    };
    at::Tensor gres = wanted(true, dres);
    if (gres.defined()) gres = gres.to(static_cast<at::ScalarType>(ctx->saved_data["res_dtype"].toInt()));
    at::Tensor gh = wanted(true, dh), ggate = wanted(true, dgate);
    at::Tensor gshift = wanted(s[5].defined(), dshift), gscale = wanted(s[6].defined(), dscale);
    at::Tensor gweight = wanted(s[7].defined(), dweight), gbias = wanted(s[8].defined(), dbias);
    return {gres, gh, ggate, gshift, gscale, gweight, gbias, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

FusedOut gated_residual_norm_modulate_autograd(const at::Tensor& res, const at::Tensor& h, const at::Tensor& gate,
                                               const OptT& shift, const OptT& scale, const OptT& weight,
                                               const OptT& bias, c10::string_view kind, double eps,
                                               c10::string_view act) {
  auto out = GatedResidualNormModulate::apply(res, h, gate, shift, scale, weight, bias, kind, eps, act);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(flowfm, Autograd, m) {
  m.impl("gated_residual", &gated_residual_autograd);
  m.impl("gated_residual_norm_modulate", &gated_residual_norm_modulate_autograd);
}

}  // namespace flowfm
