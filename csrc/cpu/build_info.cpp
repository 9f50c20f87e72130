#include "build_info.h"

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
#ifdef FLOWFM_WITH_CUDA
  info += " cuda";
#endif
  return info;
}

}  // namespace flowfm
