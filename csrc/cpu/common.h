// Shared pieces of the CPU kernels: accumulation types, loads/stores in any float dtype, a
// branch-free exp the compiler can vectorise, activations and their derivatives, and the checks
// every kernel makes on what Python already validated (defence in depth, never a crash).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "../messages.h"

#include <cmath>
#include <cstdint>
#include <c10/util/bit_cast.h>
#include <cstring>
#include <string_view>
#include <initializer_list>
#include <algorithm>
#include <type_traits>

namespace flowfm::cpu {

// fp32 accumulation for fp32/bf16/fp16, float64 for float64 (so gradcheck is meaningful).
template <typename T> struct AccT { using type = float; };
template <> struct AccT<double> { using type = double; };
template <typename T> using acc_t = typename AccT<T>::type;

inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Elementwise work per parallel chunk: big enough to amortise a task, small enough to balance 2+ cores.
constexpr int64_t kGrainElems = 1 << 14;
inline int64_t grain_rows(int64_t row_len) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, row_len)); }

// Cephes-style expf: range reduction to [-ln2/2, ln2/2], degree-6 polynomial, exponent by bit shift.
// Max relative error ~2 ulp over the clamped range. Written so that GCC vectorises it inside
// `omp simd` loops: std::min/max (not fmin/fmax) and round-to-nearest by adding and subtracting
// 1.5 * 2^23 (not std::floor); with either of those the loop stays scalar and SiLU runs ~15x slower.
#define FLOWFM_INLINE inline __attribute__((always_inline))
FLOWFM_INLINE float exp_fast(float x) {
  x = std::min(std::max(x, -87.3f), 88.7f);
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
  const float fx = (x * 1.44269504088896341f + kRound) - kRound;
  const float r = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = (static_cast<int32_t>(fx) + 127) << 23;
  return p * c10::bit_cast<float>(e);
}
FLOWFM_INLINE double exp_fast(double x) { return std::exp(x); }

// Store an accumulator value in the storage dtype. bf16 is rounded to nearest-even by integer
// arithmetic (what c10::BFloat16 does, NaN kept quiet) written so that GCC vectorises the store
// loop; c10's own conversion keeps bf16 output loops scalar (measured 4-5x slower).
template <typename S, typename A> FLOWFM_INLINE S to_storage(A v) {
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    const float f = static_cast<float>(v);
    const uint32_t u = c10::bit_cast<uint32_t>(f);
    const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return c10::BFloat16(static_cast<uint16_t>(f != f ? 0x7FC0u : r), c10::BFloat16::from_bits());
  } else {
    return static_cast<S>(v);
  }
}

// A row of storage values as fp32. bf16 -> fp32 is a 16-bit shift of the bits, written on integers
// so the loop vectorises (a row widened once and read from L1 by the fp32 row kernels ran the
// bf16 LayerNorm forward faster than converting in each of its three passes).
template <typename S> inline void widen_row(const S* __restrict x, float* __restrict out, int64_t D) {
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    const uint16_t* __restrict bits = reinterpret_cast<const uint16_t*>(x);
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) out[i] = c10::bit_cast<float>(static_cast<uint32_t>(bits[i]) << 16);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) out[i] = static_cast<float>(x[i]);
  }
}

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

template <typename A> FLOWFM_INLINE A act_fwd(Act act, A u) {
  if (act == Act::Silu) return u / (A(1) + exp_fast(-u));
  if (act == Act::GeluTanh) {
    const A k = A(0.7978845608028654), c = A(0.044715);
    A th = A(1) - A(2) / (exp_fast(A(2) * k * (u + c * u * u * u)) + A(1));
    return A(0.5) * u * (A(1) + th);
  }
  return u;
}
// d act / du at u.
template <typename A> FLOWFM_INLINE A act_grad(Act act, A u) {
  if (act == Act::Silu) {
    A s = A(1) / (A(1) + exp_fast(-u));
    return s * (A(1) + u * (A(1) - s));
  }
  if (act == Act::GeluTanh) {
    const A k = A(0.7978845608028654), c = A(0.044715);
    A th = A(1) - A(2) / (exp_fast(A(2) * k * (u + c * u * u * u)) + A(1));
    return A(0.5) * (A(1) + th) + A(0.5) * u * (A(1) - th * th) * k * (A(1) + A(3) * c * u * u);
  }
  return A(1);
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
template <typename F> inline void for_each_chunk(int64_t B, int64_t N, F&& f) {
  const int64_t per = chunks_per_sample(N);
  at::parallel_for(0, B * per, 1, [&](int64_t u0, int64_t u1) {
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

}  // namespace flowfm::cpu

#define FLOWFM_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)
