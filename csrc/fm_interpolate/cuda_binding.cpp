// CUDA kernels of flowfm::fm_interpolate / fm_interpolate_backward (schemas in csrc/ops.cpp).
// x0 and x1 are read in their promoted dtype (both as stored in the usual case); x_t and u_t come
// back in x1's dtype, dx0 / dx1 / dt in x0's / x1's / t's dtype; arithmetic is fp32 (float64 for
// float64).
#include "../common/cuda_binding.h"
#include "cuda.h"

namespace flowfm::cuda::binding {
namespace {

struct Rows { int64_t B, n; };

Rows check_pair(const at::Tensor& x0, const at::Tensor& x1, const at::Tensor& t) {
  const auto dev = x1.device();
  check_cuda_float(x1, "x1", dev);
  check_cuda_float(x0, "x0", dev);
  check_cuda_float(t, "t", dev);
  TORCH_CHECK_VALUE(x1.dim() >= 1, "x1 must be batched, (B, ...)");
  check_shape(x0, x1.sizes(), "x0");
  check_shape(t, {x1.size(0)}, "t");
  const int64_t B = x1.size(0), n = B > 0 ? x1.numel() / B : 0;
  check_row_grid(B, n, "fm_interpolate");
  return {B, n};
}

std::tuple<at::Tensor, at::Tensor> fm_interpolate_cuda(const at::Tensor& x0_in, const at::Tensor& x1_in,
                                                       const at::Tensor& t_in, double sigma_min) {
  const Rows r = check_pair(x0_in, x1_in, t_in);
  const c10::cuda::CUDAGuard guard(x1_in.device());
  const auto st = at::promote_types(x0_in.scalar_type(), x1_in.scalar_type());
  auto x0 = x0_in.to(st).contiguous(), x1 = x1_in.to(st).contiguous();
  auto t = t_in.to(acc_dtype(st)).contiguous();
  auto x_t = at::empty_like(x1), u_t = at::empty_like(x1);
  dispatch_storage(st, "fm_interpolate", [&](auto tag) {
    using S = typename decltype(tag)::type;
    fm_interpolate_forward<S>(cptr<S>(x0), cptr<S>(x1), cptr<Acc<S>>(t), ptr<S>(x_t), ptr<S>(u_t), r.B, r.n,
                              sigma_min, current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const auto out = x1_in.scalar_type();
  return {x_t.to(out), u_t.to(out)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fm_interpolate_backward_cuda(
    const c10::optional<at::Tensor>& dx_t_in, const c10::optional<at::Tensor>& du_t_in, const at::Tensor& x0_in,
    const at::Tensor& x1_in, const at::Tensor& t_in, double sigma_min) {
  const Rows r = check_pair(x0_in, x1_in, t_in);
  const c10::cuda::CUDAGuard guard(x1_in.device());
  const auto st = at::promote_types(x0_in.scalar_type(), x1_in.scalar_type());
  auto grad = [&](const c10::optional<at::Tensor>& g, const char* name) {
    if (!g.has_value() || !g->defined()) return at::Tensor();
    check_cuda_float(*g, name, x1_in.device());
    check_shape(*g, x1_in.sizes(), name);
    return g->to(st).contiguous();
  };
  auto dx_t = grad(dx_t_in, "dx_t"), du_t = grad(du_t_in, "du_t");
  auto x0 = x0_in.to(st).contiguous(), x1 = x1_in.to(st).contiguous();
  const auto acc = acc_dtype(st);
  auto t = t_in.to(acc).contiguous();
  auto dx0 = at::empty_like(x1), dx1 = at::empty_like(x1);
  auto dt = at::empty({r.B}, x1.options().dtype(acc));
  auto partial = at::empty({r.B * row_chunks(r.n)}, x1.options().dtype(acc));
  dispatch_storage(st, "fm_interpolate_backward", [&](auto tag) {
    using S = typename decltype(tag)::type;
    using A = Acc<S>;
    fm_interpolate_backward<S>(cptr_or_null<S>(dx_t), cptr_or_null<S>(du_t), cptr<S>(x0), cptr<S>(x1), cptr<A>(t),
                               ptr<S>(dx0), ptr<S>(dx1), ptr<A>(dt), ptr<A>(partial), r.B, r.n, sigma_min,
                               current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx0.to(x0_in.scalar_type()), dx1.to(x1_in.scalar_type()), dt.to(t_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(flowfm, CUDA, m) {
  m.impl("fm_interpolate", &fm_interpolate_cuda);
  m.impl("fm_interpolate_backward", &fm_interpolate_backward_cuda);
}

}  // namespace flowfm::cuda::binding
