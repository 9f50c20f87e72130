// Autograd of flowfm::timestep_embedding in C++, for every device's kernel (the Triton op keeps its
// Python formula in flowfm_fast/ops/timestep_embedding.py, which this mirrors): d emb / d t by one
// call of flowfm::timestep_embedding_backward. Integer step indices take no gradient.
#include "../common/autograd.h"

namespace flowfm {
namespace {

class TimestepEmbedding : public torch::autograd::Function<TimestepEmbedding> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& t, int64_t dim, double max_period) {
    static auto op = op_handle<at::Tensor(const at::Tensor&, int64_t, double)>("flowfm::timestep_embedding");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({t});
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["max_period"] = max_period;
    return {op.call(t, dim, max_period)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, double)>("flowfm::timestep_embedding_backward");
    if (!ctx->needs_input_grad(0)) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const auto s = ctx->get_saved_variables();
    first_order_only("flowfm::timestep_embedding", grads, s);
    return {op.call(grads[0], s[0], ctx->saved_data["dim"].toInt(), ctx->saved_data["max_period"].toDouble()),
            at::Tensor(), at::Tensor()};
  }
};

at::Tensor timestep_embedding_autograd(const at::Tensor& t, int64_t dim, double max_period) {
  return TimestepEmbedding::apply(t, dim, max_period)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(flowfm, Autograd, m) { m.impl("timestep_embedding", &timestep_embedding_autograd); }

}  // namespace flowfm
