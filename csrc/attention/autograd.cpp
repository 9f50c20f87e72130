// Autograd of flowfm::attention in C++ (CPU kernel: csrc/cpu/attention.cpp). The forward saves q,
// k, v and the softmax probabilities; the backward is one call of flowfm::attention_backward.
#include "../common/autograd.h"

#include <tuple>

namespace flowfm {
namespace {

using Pair = std::tuple<at::Tensor, at::Tensor>;
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

class Attention : public torch::autograd::Function<Attention> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               bool need_probs) {
    static auto op =
        op_handle<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>("flowfm::attention");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, probs] = op.call(q, k, v, need_probs);
    ctx->mark_non_differentiable({probs});
    ctx->set_materialize_grads(false);  // no zero-filled (B, H, T, T) gradient for probs
    ctx->save_for_backward({q, k, v, probs});
    return {out, probs};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&)>("flowfm::attention_backward");
    const auto s = ctx->get_saved_variables();
    first_order_only("flowfm::attention", grads, s);
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    TORCH_CHECK(s[3].numel() > 0, "attention: backward needs probs, but the forward ran with need_probs=False");
    auto [dq, dk, dv] = op.call(grads[0], s[0], s[1], s[2], s[3]);
    return {ctx->needs_input_grad(0) ? dq : at::Tensor(), ctx->needs_input_grad(1) ? dk : at::Tensor(),
            ctx->needs_input_grad(2) ? dv : at::Tensor(), at::Tensor()};
  }
};

Pair attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool need_probs) {
  auto out = Attention::apply(q, k, v, need_probs);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(flowfm, Autograd, m) { m.impl("attention", &attention_autograd); }

}  // namespace flowfm
