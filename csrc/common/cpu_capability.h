// The CPU capability the kernels run with: which of the variants common/cpu_variants.h compiled
// (generic, AVX2 + FMA, AVX-512) a call takes. Chosen once from the CPU's features (the best one
// compiled into this build and supported), FLOWFM_CPU_CAPABILITY=default|avx2|avx512 forces one
// as ATEN_CPU_CAPABILITY does for ATen, and set_capability changes it at run time (tests and
// benchmarks of every path on one machine). Reading it is one relaxed atomic load.
#pragma once
#include <atomic>
#include <string>
#include <vector>

namespace flowfm::cpu {

enum class Capability : int { Default = 0, Avx2 = 1, Avx512 = 2 };

namespace detail {
extern std::atomic<int> g_capability;
}

inline Capability capability() { return static_cast<Capability>(detail::g_capability.load(std::memory_order_relaxed)); }

const char* capability_name(Capability c);
// The capabilities this build compiled and this CPU can run, lowest first ("default" always).
std::vector<std::string> capabilities();
// Selects `name` (one of capabilities()); throws c10::ValueError naming the choices otherwise.
void set_capability(const std::string& name);
// How the variants were compiled: "per-capability" (x86-64 GCC: default, avx2, avx512),
// "native" (FLOWFM_NATIVE=1: one variant for the build machine), or "generic" (one variant).
const char* capability_build();

}  // namespace flowfm::cpu
