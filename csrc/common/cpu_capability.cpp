// Run-time choice of the CPU kernels' variant (see cpu_capability.h). Compiled without any target
// options: it only reads CPUID (through GCC's __builtin_cpu_supports, which also checks that the
// OS saves the AVX / AVX-512 registers) and the environment.
#include "cpu_capability.h"

#include <c10/util/Exception.h>

#include <cstdlib>

#include "cpu_variants_config.h"
#include "messages.h"

namespace flowfm::cpu {
namespace {

bool supported(Capability c) {
  switch (c) {
    case Capability::Default:
      return true;
    case Capability::Avx2:
#if FLOWFM_CPU_MULTI
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
      return false;
#endif
    case Capability::Avx512:
#if FLOWFM_CPU_MULTI
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512dq");
#else
      return false;
#endif
  }
  return false;
}

bool parse(const std::string& name, Capability* out) {
  for (Capability c : {Capability::Default, Capability::Avx2, Capability::Avx512})
    if (name == capability_name(c)) {
      *out = c;
      return true;
    }
  return false;
}

int initial() {
  // FLOWFM_CPU_CAPABILITY when it names a supported capability; Python (flowfm_fast._backend)
  // re-applies it with set_capability and reports a bad value as an error naming the variable.
  if (const char* env = std::getenv("FLOWFM_CPU_CAPABILITY")) {
    Capability c;
    if (parse(env, &c) && supported(c)) return static_cast<int>(c);
  }
  for (Capability c : {Capability::Avx512, Capability::Avx2})
    if (supported(c)) return static_cast<int>(c);
  return static_cast<int>(Capability::Default);
}

}  // namespace

namespace detail {
std::atomic<int> g_capability{initial()};
}

const char* capability_name(Capability c) {
  switch (c) {
    case Capability::Avx2: return "avx2";
    case Capability::Avx512: return "avx512";
    default: return "default";
  }
}

std::vector<std::string> capabilities() {
  std::vector<std::string> out;
  for (Capability c : {Capability::Default, Capability::Avx2, Capability::Avx512})
    if (supported(c)) out.emplace_back(capability_name(c));
  return out;
}

void set_capability(const std::string& name) {
  Capability c;
  std::string choices;
  for (const auto& s : capabilities()) choices += (choices.empty() ? "" : ", ") + s;
  TORCH_CHECK_VALUE(parse(name, &c), flowfm::msg("CPU capability must be one of 'default', 'avx2', 'avx512', got '",
                                                 name, "'"));
  TORCH_CHECK_VALUE(supported(c), flowfm::msg("CPU capability '", name, "' is not available here (this build on this CPU ",
                                              "offers: ", choices, "; build: ", capability_build(), ")"));
  detail::g_capability.store(static_cast<int>(c), std::memory_order_relaxed);
}

const char* capability_build() {
#if FLOWFM_CPU_MULTI
  return "per-capability";
#elif defined(FLOWFM_NATIVE)
  return "native";
#else
  return "generic";
#endif
}

}  // namespace flowfm::cpu
