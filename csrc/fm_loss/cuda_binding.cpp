// CUDA kernel of flowfm::fm_loss (schema in csrc/ops.cpp):
//   loss       () fp32 (float64 for float64): mean_b w_b per_sample_b   (w_b = 1 without weight)
//   per_sample (B,) same dtype: mean_i (v - u)^2, unweighted (autograd's dweight is per_sample / B)
//   dv         v's shape, same dtype, = dloss/dv, written in the same pass when need_grad;
//              an empty tensor otherwise.
// v may be bf16/fp16 while x0/x1 are fp32 (autocast: model output in low precision, data in
// fp32): that pair runs as is, any other mix is promoted first (exact upcasts).
#include "../common/cuda_binding.h"
#include "cuda.h"

namespace flowfm::cuda::binding {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> fm_loss_cuda(const at::Tensor& v_in, const at::Tensor& x0_in,
                                                            const at::Tensor& x1_in,
                                                            const c10::optional<at::Tensor>& weight_in,
                                                            double sigma_min, bool need_grad) {
  const auto dev = v_in.device();
  check_cuda_float(v_in, "v", dev);
  check_cuda_float(x0_in, "x0", dev);
  check_cuda_float(x1_in, "x1", dev);
  TORCH_CHECK_VALUE(x1_in.dim() >= 1, "x1 must be batched, (B, ...)");
  check_shape(x0_in, x1_in.sizes(), "x0");
  check_shape(v_in, x1_in.sizes(), "v");
  const int64_t B = x1_in.size(0), n = B > 0 ? x1_in.numel() / B : 0;
  const bool weighted = weight_in.has_value() && weight_in->defined();
  if (weighted) {
    check_cuda_float(*weight_in, "weight", dev);
    check_shape(*weight_in, {B}, "weight");
  }
  check_row_grid(B, n, "fm_loss");
  const c10::cuda::CUDAGuard guard(dev);

  const auto xt = at::promote_types(x0_in.scalar_type(), x1_in.scalar_type());
  const auto vt_in = v_in.scalar_type();
  const bool autocast_pair = xt == at::kFloat && (vt_in == at::kBFloat16 || vt_in == at::kHalf);
  const auto x_type = autocast_pair ? xt : at::promote_types(xt, vt_in);
  const auto v_type = autocast_pair ? vt_in : x_type;
  auto v = v_in.to(v_type).contiguous();
  auto x0 = x0_in.to(x_type).contiguous(), x1 = x1_in.to(x_type).contiguous();
  const auto acc = acc_dtype(x_type);
  auto opts = x1.options().dtype(acc);
  auto weight = weighted ? weight_in->to(acc).contiguous() : at::Tensor();
  auto loss = at::empty({}, opts);
  auto per_sample = at::empty({B}, opts);
  auto dv = need_grad ? at::empty(v_in.sizes(), opts) : at::empty({0}, opts);
  auto partial = at::empty({B * row_chunks(n)}, opts);

  auto run = [&](auto vtag, auto xtag) {
    using V = typename decltype(vtag)::type;
    using X = typename decltype(xtag)::type;
    using A = Acc<X>;
    fm_loss<V, X>(cptr<V>(v), cptr<X>(x0), cptr<X>(x1), cptr_or_null<A>(weight), ptr<A>(loss), ptr<A>(per_sample),
                  need_grad ? ptr<A>(dv) : nullptr, ptr<A>(partial), B, n, sigma_min, current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (v_type == at::kBFloat16 && x_type == at::kFloat) {
    run(Tag<__nv_bfloat16>{}, Tag<float>{});
  } else if (v_type == at::kHalf && x_type == at::kFloat) {
    run(Tag<__half>{}, Tag<float>{});
  } else {
    dispatch_storage(x_type, "fm_loss", [&](auto tag) { run(tag, tag); });
  }
  return {loss, per_sample, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(flowfm, CUDA, m) { m.impl("fm_loss", &fm_loss_cuda); }

}  // namespace flowfm::cuda::binding
