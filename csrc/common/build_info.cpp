#include "build_info.h"

#include "cpu_capability.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace flowfm {

std::string build_info() {
  std::string info = "cpu";
#ifdef _OPENMP
  info += " openmp(max_threads=" + std::to_string(omp_get_max_threads()) + ")";
#else
  info += " no-openmp";
#endif
  // The kernel variant in use and what else this build offers on this CPU.
  info += " capability=" + std::string(cpu::capability_name(cpu::capability())) + " (";
  const auto caps = cpu::capabilities();
  for (size_t i = 0; i < caps.size(); ++i) info += (i ? "," : "") + caps[i];
  info += std::string("; build ") + cpu::capability_build() + ")";
#ifdef FLOWFM_WITH_CUDA
  info += " cuda";
#endif
  return info;
}

}  // namespace flowfm
