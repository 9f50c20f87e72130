// What the CPU kernels share and that does not depend on the instruction set: torch and standard
// headers, accumulation types, activation and norm kinds, the checks every kernel makes on what
// Python already validated (defence in depth, never a crash), deterministic chunked reductions,
// and the entry point that picks a kernel variant per CPU capability (cpu_variants.h compiles
// the variants; cpu_vec.h holds the arithmetic that differs between them).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "messages.h"

#include <cmath>
#include <cstdint>
#include <c10/util/bit_cast.h>
#include <cstring>
#include <string_view>
#include <initializer_list>
#include <algorithm>
#include <type_traits>
#include <utility>
#include <memory>
#include <vector>
#include <tuple>
#include <optional>
#include <limits>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>  // every intrinsic, usable in functions compiled for its ISA
#endif

#include "cpu_capability.h"

namespace flowfm::cpu {

#define FLOWFM_INLINE inline __attribute__((always_inline))

// fp32 accumulation for fp32/bf16/fp16, float64 for float64 (so gradcheck is meaningful).
template <typename T> struct AccT { using type = float; };
template <> struct AccT<double> { using type = double; };
template <typename T> using acc_t = typename AccT<T>::type;

inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Elementwise work per parallel chunk: big enough to amortise a task, small enough to balance 2+ cores.
constexpr int64_t kGrainElems = 1 << 14;
inline int64_t grain_rows(int64_t row_len) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, row_len)); }

enum class Act { None, Silu, GeluTanh };
enum class Kind { Layer, Rms, Group };

inline Act parse_act(c10::string_view s) {
  if (s == "none") return Act::None;
  if (s == "silu") return Act::Silu;
  if (s == "gelu_tanh") return Act::GeluTanh;
  TORCH_CHECK_VALUE(false, flowfm::msg("act must be 'none', 'silu' or 'gelu_tanh', got '", std::string(s), "'"));
}
inline Kind parse_kind(c10::string_view s) {
  if (s == "layer") return Kind::Layer;
  if (s == "rms") return Kind::Rms;
  if (s == "group") return Kind::Group;
  TORCH_CHECK_VALUE(false, flowfm::msg("kind must be 'layer', 'rms' or 'group', got '", std::string(s), "'"));
}

// Calls f.template operator()<ACT>() for the runtime act: kernels are instantiated per activation.
template <typename F> inline void dispatch_act(Act act, F&& f) {
  switch (act) {
    case Act::None: f.template operator()<Act::None>(); break;
    case Act::Silu: f.template operator()<Act::Silu>(); break;
    case Act::GeluTanh: f.template operator()<Act::GeluTanh>(); break;
  }
}

// Defensive checks (Python validates first with friendlier messages; these keep direct
// torch.ops.flowfm calls from ever reading out of bounds).
inline void check_cpu_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), flowfm::msg(name, " must be a CPU tensor for the cpp backend"));
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()),
                   flowfm::msg(name, " must be a float tensor, got ", t.scalar_type()));
}
inline void check_shape(const at::Tensor& t, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == shape, flowfm::msg(name, " must have shape ", shape, ", got ", t.sizes()));
}

// Small per-sample tensors (modulation, affine, t) are converted once to the accumulation dtype.
inline at::Tensor small_acc(const c10::optional<at::Tensor>& t, at::ScalarType acc) {
  return t.has_value() && t->defined() ? t->to(acc).contiguous() : at::Tensor();
}
template <typename A> inline const A* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<A>() : nullptr;
}
template <typename A> inline A* mut_ptr_or_null(at::Tensor& t) {
  return t.defined() ? t.data_ptr<A>() : nullptr;
}
inline at::Tensor empty_grad() { return at::empty({0}); }

// Per-sample reductions over N elements are cut into fixed chunks of kChunk, each summed by one
// task into its own slot, and the slots summed in order afterwards: the result depends only on
// the shape, never on the thread count, and a batch of one still uses every core.
constexpr int64_t kChunk = 1 << 13;
inline int64_t chunks_per_sample(int64_t n) { return std::max<int64_t>(1, (n + kChunk - 1) / kChunk); }

// f(b, begin, end, slot) for every chunk [begin, end) of every sample b (offsets within the sample).
// Tasks group chunks up to kGrainElems elements: a tiny batch runs on the calling thread instead
// of waking the pool (at small sizes the wake-up cost more than the work). Slots stay per chunk,
// so the result does not depend on the grouping.
template <typename F> inline void for_each_chunk(int64_t B, int64_t N, F&& f) {
  const int64_t per = chunks_per_sample(N);
  at::parallel_for(0, B * per, grain_rows(std::min(N, kChunk)), [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / per, c = u % per;
      f(b, c * kChunk, std::min(N, (c + 1) * kChunk), u);
    }
  });
}

// Sums the (B, per) chunk slots of each sample in order into out (B,).
template <typename A> inline void sum_slots(const A* slots, int64_t B, int64_t per, A* out) {
  for (int64_t b = 0; b < B; ++b) {
    A acc = A(0);
    for (int64_t c = 0; c < per; ++c) acc += slots[b * per + c];
    out[b] = acc;
  }
}

// Same-dtype views of the inputs of an elementwise kernel: when dtypes differ, every input is
// promoted exactly (bf16/fp16 -> fp32 is lossless) so the kernel sees one type, as the reference does.
inline at::ScalarType common_float(std::initializer_list<at::Tensor> ts) {
  at::ScalarType st = ts.begin()->scalar_type();
  for (const auto& t : ts) st = at::promote_types(st, t.scalar_type());
  return st;
}


// The entry point registered with torch for a kernel function `fn` that cpu_variants.h compiled
// once per capability: it calls the variant of the capability in use (one atomic load and a switch).
template <auto Generic, auto Avx2, auto Avx512> struct ByCapability;
template <typename R, typename... Args, R (*Generic)(Args...), R (*Avx2)(Args...), R (*Avx512)(Args...)>
struct ByCapability<Generic, Avx2, Avx512> {
  static R call(Args... args) {
    switch (capability()) {
      case Capability::Avx512: return Avx512(std::forward<Args>(args)...);
      case Capability::Avx2: return Avx2(std::forward<Args>(args)...);
      default: return Generic(std::forward<Args>(args)...);
    }
  }
};
#define FLOWFM_CPU_BY_CAPABILITY(fn) \
  (&::flowfm::cpu::ByCapability<&::flowfm::cpu::generic::fn, &::flowfm::cpu::avx2::fn, &::flowfm::cpu::avx512::fn>::call)

}  // namespace flowfm::cpu

#define FLOWFM_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)
