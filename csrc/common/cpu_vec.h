// The CPU kernels' arithmetic that depends on the instruction set: exp, activations, dtype
// conversions in loops the compiler vectorises, and the intrinsic paths. No include guard on
// purpose: common/cpu_variants.h includes it once per CPU capability, each time inside that
// capability's namespace and target options, with FLOWFM_CPU_AVX2 / FLOWFM_CPU_AVX512 saying
// what the code may use (GCC's __AVX2__ / __AVX512F__ stay undefined under a target pragma).
// Headers are included by common/cpu.h, before any capability's region.

// min(max(x, lo), hi), NaN kept, as a select on the bits: GCC 12 leaves a loop with a float
// compare-and-select (std::min / max, or ?:) scalar for the baseline x86-64 target ("control flow
// in loop"; the AVX variants have intrinsic paths), and the baseline variant's SiLU ran ~8x slower
// than the avx512 one (benchmarks/results/cpu-avx512-epyc-variants.md). The masks vectorise.
FLOWFM_INLINE float clamp_select(float x, float lo, float hi) {
  const uint32_t below = 0u - static_cast<uint32_t>(x < lo), above = 0u - static_cast<uint32_t>(x > hi);
  const uint32_t bits = (c10::bit_cast<uint32_t>(x) & ~(below | above)) | (c10::bit_cast<uint32_t>(lo) & below) |
                        (c10::bit_cast<uint32_t>(hi) & above);
  return c10::bit_cast<float>(bits);
}

// Cephes-style expf: range reduction to [-ln2/2, ln2/2], degree-6 polynomial, exponent by bit shift.
// Max relative error ~2 ulp over the clamped range. Written so that GCC vectorises it inside
// `omp simd` loops: the clamp as a bit select (above) and round-to-nearest by adding and subtracting
// 1.5 * 2^23 (not std::floor); with std::floor the loop stays scalar and SiLU runs ~15x slower.
FLOWFM_INLINE float exp_fast(float x) {
  x = clamp_select(x, -87.3f, 88.7f);
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
// (~40% of copy BW). With AVX-512 (an AVX-512 EPYC) a separate pass with intrinsics (exp by
// roundscale + scalef, one division) ran SiLU 1.8x faster in a microbenchmark (0.12 vs 0.22 ns
// per value on one core). Same clamp and polynomial as exp_fast, so both paths agree to rounding.
#if FLOWFM_CPU_AVX512
namespace v16 {
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
// As function objects rather than lambdas: a captureless lambda also gets a conversion to a plain
// function pointer, compiled without the region's target (GCC warns of its vector ABI).
struct Exp16 {
  FLOWFM_INLINE __m512 operator()(__m512 v) const { return exp(v); }
};
template <Act ACT, bool GRAD> struct Act16 {
  FLOWFM_INLINE __m512 operator()(__m512 v) const { return act<ACT, GRAD>(v); }
};
}  // namespace v16
#endif

#if FLOWFM_CPU_AVX2 && !FLOWFM_CPU_AVX512
// x[i] = f(x[i]) over n fp32 values, 8 lanes at a time, the tail through a zero-padded copy.
template <typename F> FLOWFM_INLINE void map8_inplace(float* __restrict x, int64_t n, F f) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, f(_mm256_loadu_ps(x + i)));
  if (i < n) {
    alignas(32) float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(tail, x + i, sizeof(float) * (n - i));
    _mm256_store_ps(tail, f(_mm256_load_ps(tail)));
    std::memcpy(x + i, tail, sizeof(float) * (n - i));
  }
}
#endif

#if FLOWFM_CPU_AVX512
// x[i] = f(x[i]) over n fp32 values, 16 lanes at a time, the tail under a mask (masked-off lanes
// read as 0 and are not written).
template <typename F> FLOWFM_INLINE void map16_inplace(float* __restrict x, int64_t n, F f) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, f(_mm512_loadu_ps(x + i)));
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
    _mm512_mask_storeu_ps(x + i, m, f(_mm512_maskz_loadu_ps(m, x + i)));
  }
}
#endif

#if FLOWFM_CPU_AVX2 && !FLOWFM_CPU_AVX512
// The same exp and activations on 8 lanes (AVX2 + FMA). AVX2 has no roundscale / scalef: n is
// rounded with vroundps and 2^n built in the exponent bits, exactly as exp_fast does, so this
// path agrees with the scalar one to rounding.
namespace v8 {
FLOWFM_INLINE __m256 exp(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.7f), _mm256_max_ps(_mm256_set1_ps(-87.3f), x));  // NaN stays NaN
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

template <Act ACT, bool GRAD> FLOWFM_INLINE __m256 act(__m256 u) {
  const __m256 one = _mm256_set1_ps(1.f);
  if constexpr (ACT == Act::Silu) {
    const __m256 d = _mm256_add_ps(one, exp(_mm256_sub_ps(_mm256_setzero_ps(), u)));
    if constexpr (!GRAD) return _mm256_div_ps(u, d);
    const __m256 s = _mm256_div_ps(one, d);  // s (1 + u (1 - s))
    return _mm256_mul_ps(s, _mm256_fmadd_ps(u, _mm256_sub_ps(one, s), one));
  } else if constexpr (ACT == Act::GeluTanh) {
    const __m256 k = _mm256_set1_ps(0.7978845608028654f), c = _mm256_set1_ps(0.044715f);
    const __m256 half = _mm256_set1_ps(0.5f), u2 = _mm256_mul_ps(u, u);
    const __m256 z = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(2.f), k), _mm256_fmadd_ps(_mm256_mul_ps(c, u2), u, u));
    const __m256 th = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.f), _mm256_add_ps(exp(z), one)));
    if constexpr (!GRAD) return _mm256_mul_ps(_mm256_mul_ps(half, u), _mm256_add_ps(one, th));
    const __m256 sech2 = _mm256_fnmadd_ps(th, th, one);
    const __m256 dz = _mm256_mul_ps(k, _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(3.f), c), u2, one));
    return _mm256_fmadd_ps(_mm256_mul_ps(half, u), _mm256_mul_ps(sech2, dz), _mm256_mul_ps(half, _mm256_add_ps(one, th)));
  } else {
    return GRAD ? one : u;
  }
}
struct Exp8 {
  FLOWFM_INLINE __m256 operator()(__m256 v) const { return exp(v); }
};
template <Act ACT, bool GRAD> struct Act8 {
  FLOWFM_INLINE __m256 operator()(__m256 v) const { return act<ACT, GRAD>(v); }
};
}  // namespace v8
#endif

template <Act ACT, bool GRAD> inline void act_inplace(float* __restrict u, int64_t n) {
  if constexpr (ACT == Act::None && !GRAD) return;
#if FLOWFM_CPU_AVX512
  map16_inplace(u, n, v16::Act16<ACT, GRAD>{});
#elif FLOWFM_CPU_AVX2
  map8_inplace(u, n, v8::Act8<ACT, GRAD>{});
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

// x -> exp(x) over n values in place (exp_fast's clamp and polynomial; AVX-512 or AVX2 intrinsics where
// compiled for, as act_inplace: GCC's vectorisation of exp_fast in a short loop of a softmax row was ~5x slower).
inline void exp_inplace(float* __restrict x, int64_t n) {
#if FLOWFM_CPU_AVX512
  map16_inplace(x, n, v16::Exp16{});
#elif FLOWFM_CPU_AVX2
  map8_inplace(x, n, v8::Exp8{});
#else
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = exp_fast(x[i]);
#endif
}
inline void exp_inplace(double* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

