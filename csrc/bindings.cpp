// Python module of flowfm_fast._C. The kernels themselves are torch ops (torch.ops.flowfm.*,
// schemas in ops.cpp) registered when this module is imported; pybind11 only adds build facts.
#include <torch/extension.h>

#include "cpu/build_info.h"
#include "version.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flowfm_fast compiled kernels";
  m.attr("ABI_VERSION") = FLOWFM_ABI_VERSION;
  m.def("build_info", &flowfm::build_info, "How this extension was compiled (OpenMP threads, CUDA).");
}
