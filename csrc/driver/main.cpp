// Training-step-shaped workload for Nsight Systems / Nsight Compute, without Python in the way.
// Today it exercises libtorch ops in the shape of one adaLN DiT block; the fused kernels are
// called here as they land.   nsys profile ./build/flowfm_driver [iters]
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "cpu/build_info.h"

int main(int argc, char** argv) {
  const int iters = argc > 1 ? std::atoi(argv[1]) : 20;
  const int64_t B = 64, T = 30, D = 128;
  auto dev = torch::cuda::is_available() ? torch::kCUDA : torch::kCPU;
  auto opts = torch::TensorOptions().device(dev).requires_grad(true);
  auto x = torch::randn({B, T, D}, opts);
  auto shift = torch::randn({B, D}, opts), scale = torch::randn({B, D}, opts), gate = torch::randn({B, D}, opts);
  auto w = torch::randn({D, D}, opts);
  std::printf("flowfm driver: %s, device %s\n", flowfm::build_info().c_str(), dev == torch::kCUDA ? "cuda" : "cpu");
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) {
    auto h = torch::layer_norm(x, {D}, {}, {}, 1e-6) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1);
    auto y = x + gate.unsqueeze(1) * torch::matmul(h, w);
    y.square().mean().backward();
  }
  if (dev == torch::kCUDA) torch::cuda::synchronize();
  double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%d iterations, %.3f ms each\n", iters, ms / iters);
  return 0;
}
