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
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

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

// The activation over n fp32 values in place: u -> act(u) (GRAD = false) or u -> act'(u)
// (GRAD = true). The row kernels compute u into a buffer and call this on it while it sits in L1:
// inside their fused `omp simd` loops GCC 12 compiles act_fwd with two divisions per vector (the
// clamp in exp_fast splits the loop into masked paths) and SiLU was the limit of every SiLU case
// (~40% of copy BW). With AVX-512 (this machine's EPYC) a separate pass with intrinsics (exp by
// roundscale + scalef, one division) ran SiLU 1.8x faster in a microbenchmark (0.12 vs 0.22 ns
// per value on one core). Same clamp and polynomial as exp_fast, so both paths agree to rounding.
#if defined(__AVX512F__)
namespace avx512 {
// The zero-masking forms with every lane selected: the plain _mm512_max_ps / min / roundscale /
// scalef start from _mm512_undefined_ps, which GCC 12 reports as maybe-uninitialized.
constexpr __mmask16 kAll = 0xFFFF;
FLOWFM_INLINE __m512 exp(__m512 x) {
  // vmaxps / vminps return their second operand when either is NaN: x goes second, so NaN stays NaN.
  x = _mm512_maskz_min_ps(kAll, _mm512_set1_ps(88.7f), _mm512_maskz_max_ps(kAll, _mm512_set1_ps(-87.3f), x));
  const __m512 n = _mm512_maskz_roundscale_ps(kAll, _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_maskz_scalef_ps(kAll, p, n);  // p * 2^n
}

template <Act ACT, bool GRAD> FLOWFM_INLINE __m512 act(__m512 u) {
  const __m512 one = _mm512_set1_ps(1.f);
  if constexpr (ACT == Act::Silu) {
    const __m512 d = _mm512_add_ps(one, exp(_mm512_sub_ps(_mm512_setzero_ps(), u)));
    if constexpr (!GRAD) return _mm512_div_ps(u, d);
    const __m512 s = _mm512_div_ps(one, d);  // s (1 + u (1 - s))
    return _mm512_mul_ps(s, _mm512_fmadd_ps(u, _mm512_sub_ps(one, s), one));
  } else if constexpr (ACT == Act::GeluTanh) {
    const __m512 k = _mm512_set1_ps(0.7978845608028654f), c = _mm512_set1_ps(0.044715f);
    const __m512 half = _mm512_set1_ps(0.5f), u2 = _mm512_mul_ps(u, u);
    const __m512 z = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(2.f), k), _mm512_fmadd_ps(_mm512_mul_ps(c, u2), u, u));
    const __m512 th = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(exp(z), one)));
    if constexpr (!GRAD) return _mm512_mul_ps(_mm512_mul_ps(half, u), _mm512_add_ps(one, th));
    // 0.5 (1 + th) + 0.5 u (1 - th^2) k (1 + 3 c u^2)
    const __m512 sech2 = _mm512_fnmadd_ps(th, th, one);
    const __m512 dz = _mm512_mul_ps(k, _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(3.f), c), u2, one));
    return _mm512_fmadd_ps(_mm512_mul_ps(half, u), _mm512_mul_ps(sech2, dz), _mm512_mul_ps(half, _mm512_add_ps(one, th)));
  } else {
    return GRAD ? one : u;
  }
}
}  // namespace avx512
#endif

#if defined(__AVX512F__)
// x[i] = f(x[i]) over n fp32 values, 16 lanes at a time, the tail under a mask (masked-off lanes
// read as 0 and are not written).
template <typename F> FLOWFM_INLINE void map16_inplace(float* __restrict x, int64_t n, F&& f) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, f(_mm512_loadu_ps(x + i)));
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
    _mm512_mask_storeu_ps(x + i, m, f(_mm512_maskz_loadu_ps(m, x + i)));
  }
}
#endif

template <Act ACT, bool GRAD> inline void act_inplace(float* __restrict u, int64_t n) {
  if constexpr (ACT == Act::None && !GRAD) return;
#if defined(__AVX512F__)
  map16_inplace(u, n, [](__m512 v) { return avx512::act<ACT, GRAD>(v); });
#else
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) u[i] = GRAD ? act_grad<float>(ACT, u[i]) : act_fwd<float>(ACT, u[i]);
#endif
}

// y[0:n] = act(u[i]) with u[i] = u_of(i) in the accumulation dtype A. For an fp32 activation, u is
// written first (into y itself when y is fp32, else into ``scratch``, n values) and act_inplace runs
// over it while it is in L1; otherwise one fused loop. The row kernels' forward epilogue.
template <Act ACT, typename A, typename S, typename F>
FLOWFM_INLINE void act_store(S* __restrict y, A* __restrict scratch, int64_t n, F&& u_of) {
  if constexpr (ACT != Act::None && std::is_same_v<A, float>) {
    float* __restrict u;
    if constexpr (std::is_same_v<S, float>) u = y; else u = scratch;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) u[i] = u_of(i);
    act_inplace<ACT, false>(u, n);
    if constexpr (!std::is_same_v<S, float>) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) y[i] = to_storage<S>(u[i]);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = to_storage<S>(act_fwd<A>(ACT, u_of(i)));
  }
}

// x -> exp(x) over n values in place (exp_fast's clamp and polynomial; AVX-512 where available,
// as act_inplace: GCC's vectorisation of exp_fast in a short loop of a softmax row was ~5x slower).
inline void exp_inplace(float* __restrict x, int64_t n) {
#if defined(__AVX512F__)
  map16_inplace(x, n, [](__m512 v) { return avx512::exp(v); });
#else
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = exp_fast(x[i]);
#endif
}
inline void exp_inplace(double* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
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
