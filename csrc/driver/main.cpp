// Training-step-shaped workload for Nsight Systems / Nsight Compute (and perf on CPU), without
// Python in the way: the forward and backward of one adaLN-Zero DiT block plus the flow-matching
// path and loss, through the flowfm ops (torch.ops.flowfm.*, the same kernels the package runs).
//   ./build/flowfm_driver [iters] [B] [T] [D]        e.g. nsys profile ./build/flowfm_driver 50
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "../common/build_info.h"

namespace {

using Opt = c10::optional<at::Tensor>;

template <typename Sig> c10::TypedOperatorHandle<Sig> flowfm_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

}  // namespace

int main(int argc, char** argv) {
  const int iters = argc > 1 ? std::atoi(argv[1]) : 20;
  const int64_t B = argc > 2 ? std::atoll(argv[2]) : 64, T = argc > 3 ? std::atoll(argv[3]) : 30,
                D = argc > 4 ? std::atoll(argv[4]) : 128, C = 3, L = 300;
  auto dev = torch::cuda::is_available() ? torch::kCUDA : torch::kCPU;
  auto opts = torch::TensorOptions().device(dev);
  using NM = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const Opt&, const Opt&, const Opt&,
                                                            const Opt&, c10::string_view, double, c10::string_view,
                                                            int64_t);
  using NMB = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&, const Opt&, const Opt&,
      const Opt&, c10::string_view, c10::string_view, int64_t);
  using GR = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&);
  using GRB = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&);
  using FI = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, double);
  using FL = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                            const Opt&, double, bool);
  auto norm_modulate = flowfm_op<NM>("flowfm::norm_modulate");
  auto norm_modulate_bwd = flowfm_op<NMB>("flowfm::norm_modulate_backward");
  auto gated_residual = flowfm_op<GR>("flowfm::gated_residual");
  auto gated_residual_bwd = flowfm_op<GRB>("flowfm::gated_residual_backward");
  auto fm_interpolate = flowfm_op<FI>("flowfm::fm_interpolate");
  auto fm_loss = flowfm_op<FL>("flowfm::fm_loss");

  auto x = torch::randn({B, T, D}, opts);
  auto shift = torch::randn({B, D}, opts), scale = torch::randn({B, D}, opts), gate = torch::randn({B, D}, opts);
  auto w = torch::randn({D, D}, opts) / std::sqrt(double(D));
  auto x0 = torch::randn({B, C, L}, opts), x1 = torch::randn({B, C, L}, opts), t = torch::rand({B}, opts);
  std::printf("flowfm driver: %s, device %s, B=%lld T=%lld D=%lld\n", flowfm::build_info().c_str(),
              dev == torch::kCUDA ? "cuda" : "cpu", (long long)B, (long long)T, (long long)D);
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) {
    // forward: h = LN(x)(1 + scale) + shift; y = x + gate * (h W); loss of the path's target
    auto [x_t, u_t] = fm_interpolate.call(x0, x1, t, 0.0);
    auto [h, mean, rstd] = norm_modulate.call(x, shift, scale, Opt(), Opt(), "layer", 1e-6, "silu", 1);
    auto hw = torch::matmul(h, w);
    auto y = gated_residual.call(x, hw, gate);
    auto v = x_t + 0.01 * y.mean();
    auto [loss, per_sample, dv] = fm_loss.call(v, x0, x1, Opt(), 0.0, true);
    // backward with an upstream gradient of ones for y
    auto dy = torch::ones_like(y);
    auto [dhw, dgate] = gated_residual_bwd.call(dy, hw, gate);
    auto dh = torch::matmul(dhw, w.t());
    auto grads = norm_modulate_bwd.call(dh, x, mean, rstd, shift, scale, Opt(), Opt(), "layer", "silu", 1);
    (void)loss;
    (void)grads;
  }
  if (dev == torch::kCUDA) torch::cuda::synchronize();
  double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%d iterations, %.3f ms each\n", iters, ms / iters);
  return 0;
}
