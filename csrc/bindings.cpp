// Python bindings of flowfm_fast._C. For now the extension only reports how it was built; the
// fused CPU and CUDA kernels register themselves here as they land.
#include <torch/extension.h>

#include "cpu/build_info.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flowfm_fast compiled kernels";
  m.def("build_info", &flowfm::build_info, "How this extension was compiled (OpenMP threads, CUDA).");
}
