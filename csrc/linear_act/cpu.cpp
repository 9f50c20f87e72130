// linear_act: y = act(x W^T + b), forward and backward, x (M, K) rows, W (N, K), b (N,).
//
// fp32 GEMMs run through our register-tiled kernel (gemm_small in cpu_kernels.h) or the libraries,
// per GEMM and CPU capability as measured (kGemmForwardAnySize and beside it): small problems and
// the weight gradient always ours in the AVX2 / AVX-512 variants, the forward at every size with
// AVX-512, and the rest through oneDNN (ATen's mkldnn::_linear_pointwise, the op Inductor's CPU
// lowering calls) from kDnnMinWork, below it ATen's sgemm. Other dtypes go through ATen (bf16 and
// fp16 matmuls reach oneDNN through it where the CPU has them; float64 has no oneDNN kernel). The
// activation is ours (act_inplace over L1-resident rows): ATen's GELU-tanh ran at ~0.8 ns per
// value on 2 cores, more than the GEMM's epilogue could hide. u = x W^T + b is kept for the
// backward (as eager autograd keeps GELU's input).
#include "../common/cpu.h"
#include <ATen/core/dispatch/Dispatcher.h>
#include <optional>
#include <tuple>

namespace flowfm::cpu {
namespace {

using DnnSig = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                          c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>);

// The oneDNN linear, when this torch build has it (absent in builds without mkldnn).
const std::optional<c10::TypedOperatorHandle<DnnSig>>& dnn_linear() {
  static const std::optional<c10::TypedOperatorHandle<DnnSig>> handle =
      []() -> std::optional<c10::TypedOperatorHandle<DnnSig>> {
    auto h = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!h.has_value() || !h->hasKernelForDispatchKey(c10::DispatchKey::CPU)) return std::nullopt;
    return h->typed<DnnSig>();
  }();
  return handle;
}

}  // namespace
}  // namespace flowfm::cpu

#define FLOWFM_CPU_KERNELS "../linear_act/cpu_kernels.h"
#include "../common/cpu_variants.h"

TORCH_LIBRARY_IMPL(flowfm, CPU, m) {
  m.impl("linear_act", FLOWFM_CPU_BY_CAPABILITY(linear_act_cpu));
  m.impl("linear_act_backward", FLOWFM_CPU_BY_CAPABILITY(linear_act_backward_cpu));
}
