// CUDA kernels of flowfm::euler_step_ and flowfm::rk_combine (schemas in csrc/ops.cpp).
// Both update a caller's tensor in place, with the CPU kernels' conventions
// (csrc/cpu/integrator_update.cpp): arithmetic in fp32 (float64 for float64), one rounding to the
// destination's dtype; inputs of another dtype are promoted exactly, never rounded first. A
// non-contiguous destination is computed into a contiguous temporary and copied back, so strides
// never reach the kernels.
#include "../common/cuda_binding.h"
#include "cuda.h"

#include <vector>

namespace flowfm::cuda::binding {
namespace {

void euler_step_cuda(const at::Tensor& x, const at::Tensor& v_in, double dt) {
  const auto dev = x.device();
  check_cuda_float(x, "x", dev);
  check_cuda_float(v_in, "v", dev);
  check_shape(v_in, x.sizes(), "v");
  const c10::cuda::CUDAGuard guard(dev);
  const auto st = x.scalar_type();
  // A v of another dtype is promoted exactly to the accumulation dtype (never rounded to x's).
  const bool same = v_in.scalar_type() == st;
  auto v = same ? v_in.contiguous() : v_in.to(acc_dtype(st)).contiguous();
  auto target = x.is_contiguous() ? x : x.contiguous();
  dispatch_storage(st, "euler_step_", [&](auto tag) {
    using S = typename decltype(tag)::type;
    if (same)
      euler_step<S, S>(ptr<S>(target), cptr<S>(v), target.numel(), dt, current_stream());
    else
      euler_step<S, Acc<S>>(ptr<S>(target), cptr<Acc<S>>(v), target.numel(), dt, current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!target.is_same(x)) x.copy_(target);
}

void rk_combine_cuda(const at::Tensor& out, const at::Tensor& x_in, at::TensorList ks_in, at::ArrayRef<double> bs,
                     double dt) {
  const auto dev = out.device();
  check_cuda_float(out, "out", dev);
  check_cuda_float(x_in, "x", dev);
  check_shape(x_in, out.sizes(), "x");
  TORCH_CHECK_VALUE(!ks_in.empty() && ks_in.size() == bs.size(),
                    flowfm::msg("ks and bs must be non-empty and of equal length, got ", ks_in.size(), " and ",
                                bs.size()));
  for (const auto& k : ks_in) {
    check_cuda_float(k, "ks[i]", dev);
    check_shape(k, out.sizes(), "ks[i]");
  }
  const c10::cuda::CUDAGuard guard(dev);
  // As the CPU kernel: work in out's dtype when every input has it (the solver's case: no copy),
  // else promote every input exactly to the accumulation dtype and round once into out.
  const auto st = out.scalar_type();
  bool same = x_in.scalar_type() == st;
  for (const auto& k : ks_in) same = same && k.scalar_type() == st;
  const auto work = same ? st : acc_dtype(st);
  auto x = x_in.to(work).contiguous();
  // Stages with b_i == 0 are skipped, as the reference does (0 * inf would otherwise be NaN).
  std::vector<at::Tensor> ks;
  std::vector<double> coefs;
  for (size_t i = 0; i < ks_in.size(); ++i) {
    if (bs[i] == 0.0) continue;
    ks.push_back(ks_in[i].to(work).contiguous());
    coefs.push_back(dt * bs[i]);
  }
  // out is written directly when it is a contiguous buffer of the work dtype. Past kMaxStages the
  // launcher makes several passes over out, so out must then not also be one of the stages.
  bool direct = out.is_contiguous() && work == st;
  if (direct && static_cast<int>(ks.size()) > kMaxStages)
    for (const auto& k : ks) direct = direct && !k.is_alias_of(out);
  auto target = direct ? out : at::empty(out.sizes(), out.options().dtype(work));
  if (ks.empty()) {
    if (!target.is_same(x)) target.copy_(x);
  } else {
    dispatch_storage(work, "rk_combine", [&](auto tag) {
      using S = typename decltype(tag)::type;
      std::vector<const S*> kp;
      for (const auto& k : ks) kp.push_back(cptr<S>(k));
      rk_combine<S>(ptr<S>(target), cptr<S>(x), kp.data(), coefs.data(), static_cast<int>(kp.size()), x.numel(),
                    current_stream());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (!target.is_same(out)) out.copy_(target);
}

}  // namespace

TORCH_LIBRARY_IMPL(flowfm, CUDA, m) {
  m.impl("euler_step_", &euler_step_cuda);
  m.impl("rk_combine", &rk_combine_cuda);
}

}  // namespace flowfm::cuda::binding
