// Python module of flowfm_fast._C. The kernels themselves are torch ops (torch.ops.flowfm.*,
// schemas in schema.cpp) registered when this module is imported; pybind11 only adds build facts.
#include <torch/extension.h>

#include "common/build_info.h"
#include "common/cpu_capability.h"
#include "version.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flowfm_fast compiled kernels";
  m.attr("ABI_VERSION") = FLOWFM_ABI_VERSION;
  m.def("build_info", &flowfm::build_info,
        "How this extension was compiled and what runs: OpenMP threads, the CPU capability, CUDA.");
  m.def("cpu_capability", []() { return std::string(flowfm::cpu::capability_name(flowfm::cpu::capability())); },
        "The CPU kernel variant in use: 'default', 'avx2' or 'avx512'.");
  m.def("cpu_capabilities", &flowfm::cpu::capabilities,
        "The CPU kernel variants this build compiled and this CPU runs, lowest first.");
  m.def("set_cpu_capability", &flowfm::cpu::set_capability, "Use the named CPU kernel variant from now on.");
  m.def("cpu_capability_build", []() { return std::string(flowfm::cpu::capability_build()); },
        "'per-capability' (variants chosen at run time), 'native' (FLOWFM_NATIVE=1) or 'generic'.");
}
