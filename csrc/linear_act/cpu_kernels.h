// The linear_act CPU kernels and their torch-facing functions, compiled once per CPU capability
// (included by cpu.cpp through common/cpu_variants.h: no include guard, no torch includes here).

// Below this many multiply-adds oneDNN's per-call setup (primitive lookup, weight reorder) lost to
// MKL in a sweep of the model's shapes: (64, 128) x (128, 128) 23 vs 17 us; (64, 128) x (768, 128)
// 57 vs 79 us.
constexpr int64_t kDnnMinWork = int64_t(1) << 22;
// Where gemm_small (our register-tiled fp32 GEMM, below) runs instead of the libraries, from
// interleaved comparisons on a Zen 5 EPYC (benchmarks/compare_gemm.py, results in
// benchmarks/results/cpu-avx512-epyc-gemm.md): every problem below kDnnMinWork from
// kGemmSmallMinRows rows (ATen's sgemm there is MKL's AVX2 path on AMD CPUs); the weight gradient
// at every size (it reads gu's columns and x's rows in place, where oneDNN needed two transpose
// copies and MKL's AVX2 path was no faster); with AVX-512 the forward at every size as well. The
// input gradient above kDnnMinWork stays on oneDNN, which was as fast or faster there.
constexpr bool kGemmForwardAnySize = FLOWFM_CPU_AVX512;
// Where gemm_small cannot take the weight gradient (operands with strided rows): oneDNN on
// AVX-512 only: on an AVX2 EPYC MKL's sgemm reads the transposes in place and oneDNN (after a
// transpose copy) took 1.1-2x its time in every model shape (benchmarks/results/cpu-avx2-gemm.md).
constexpr bool kDnnWeightGrad = FLOWFM_CPU_AVX512;

// GCC 12 reports the intrinsics' internal _mm512_undefined_ps as maybe-uninitialized wherever the
// loads, unpacks and shuffles below inline: a false positive.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#if FLOWFM_CPU_AVX512
// d (16 x 16, row stride ld) = transpose of s (16 x 16, row stride ls), in registers: unpack
// pairs of rows, then pairs of pairs (as doubles), then 128-bit lanes twice.
FLOWFM_INLINE void transpose16(const float* s, int64_t ls, float* d, int64_t ld) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(s + i * ls);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  auto pd = [](__m512 v) { return _mm512_castps_pd(v); };
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[4 * i]), pd(t[4 * i + 2])));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[4 * i]), pd(t[4 * i + 2])));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[4 * i + 1]), pd(t[4 * i + 3])));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[4 * i + 1]), pd(t[4 * i + 3])));
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    _mm512_storeu_ps(d + j * ld, _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88));
    _mm512_storeu_ps(d + (8 + j) * ld, _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd));
  }
}
#endif

#if FLOWFM_CPU_AVX2 && !FLOWFM_CPU_AVX512
// d (8 x 8, row stride ld) = transpose of s (8 x 8, row stride ls), in registers: unpack pairs of
// rows, shuffle pairs of pairs, then swap 128-bit halves.
FLOWFM_INLINE void transpose8(const float* s, int64_t ls, float* d, int64_t ld) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(s + i * ls);
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    r[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    _mm256_storeu_ps(d + j * ld, _mm256_permute2f128_ps(r[j], r[4 + j], 0x20));
    _mm256_storeu_ps(d + (4 + j) * ld, _mm256_permute2f128_ps(r[j], r[4 + j], 0x31));
  }
}
#endif

// The row-major copy of a fp32 matrix given as the transpose of a contiguous one (a.t() of an
// (R, C) tensor). oneDNN's linear makes a strided input contiguous through ATen's generic copy,
// which took ~160 us for the 1920 x 128 transposes of every dW here (2 threads); 16 x 16 tiles
// transposed in AVX-512 registers (8 x 8 ones with AVX2) took 27 us on one thread in a microbenchmark (a scalar tiled
// loop: 54-100 us).
at::Tensor contiguous_transpose(const at::Tensor& a) {
  const int64_t rows = a.size(0), cols = a.size(1);  // out[r][c] = src[c][r], src (cols, rows) row-major
  at::Tensor out = at::empty({rows, cols}, a.options());
  const float* src = a.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  constexpr int64_t kTile = 16;
  auto scalar = [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = c0; c < c1; ++c) dst[r * cols + c] = src[c * rows + r];
  };
  // Bands of 16 source rows (16 output columns) per task.
  at::parallel_for(0, (cols + kTile - 1) / kTile, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t band = b0; band < b1; ++band) {
      const int64_t c0 = band * kTile, c1 = std::min(cols, c0 + kTile);
      int64_t r0 = 0;
#if FLOWFM_CPU_AVX512
      if (c1 - c0 == kTile)
        for (; r0 + kTile <= rows; r0 += kTile) transpose16(src + c0 * rows + r0, rows, dst + r0 * cols + c0, cols);
#elif FLOWFM_CPU_AVX2
      if (c1 - c0 == kTile)
        for (; r0 + 8 <= rows; r0 += 8)
          for (int64_t h = 0; h < kTile; h += 8)
            transpose8(src + (c0 + h) * rows + r0, rows, dst + r0 * cols + c0 + h, cols);
#endif
      scalar(r0, rows, c0, c1);
    }
  });
  return out;
}
#pragma GCC diagnostic pop

#if FLOWFM_CPU_AVX2
// Our fp32 GEMM. It began with the small problems: the DiT's token GEMMs when sampling at batch 1
// (M = 30 rows, K, N = 128-512) are a third of a step there, and ATen's sgemm (MKL's AVX2 path on
// AMD CPUs) ran them at ~40 % of one core's AVX-512 peak. C (M, N) = A (M, K) Bt (K, N) + bias, in
// register tiles of kGemmMR rows x kGemmNV vectors (broadcast A, stream Bt rows), blocked over K
// and M for the caches. Bt is the weight (N, K) transposed per panel of kGemmNV vectors into a
// per-thread buffer (~1/8 of the panel's FMAs at M = 30, K = 128), or read in place where the
// caller has it as rows of K x N (dx = gu W; dW = gu^T x). Panels and bands of rows are split
// between threads; the activation runs on a block of rows while it is in L2.
#if FLOWFM_CPU_AVX512
struct GemmVec {
  using V = __m512;
  using Mask = __mmask16;
  static constexpr int L = 16;
  static FLOWFM_INLINE Mask mask(int64_t n) { return n >= 16 ? Mask(0xFFFF) : Mask((1u << n) - 1u); }
  static FLOWFM_INLINE V zero() { return _mm512_setzero_ps(); }
  static FLOWFM_INLINE V load(const float* p) { return _mm512_loadu_ps(p); }
  static FLOWFM_INLINE V load(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static FLOWFM_INLINE V bcast(const float* p) { return _mm512_set1_ps(*p); }
  static FLOWFM_INLINE V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static FLOWFM_INLINE V add(V a, V b) { return _mm512_add_ps(a, b); }
  static FLOWFM_INLINE void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static FLOWFM_INLINE void store(float* p, V v, Mask m) { _mm512_mask_storeu_ps(p, m, v); }
};
constexpr int kGemmNV = 4;  // 6 x 4 accumulators + 4 Bt vectors + 1 broadcast of 32 registers
#else
struct GemmVec {
  using V = __m256;
  using Mask = __m256i;
  static constexpr int L = 8;
  static FLOWFM_INLINE Mask mask(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, 8))),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static FLOWFM_INLINE V zero() { return _mm256_setzero_ps(); }
  static FLOWFM_INLINE V load(const float* p) { return _mm256_loadu_ps(p); }
  static FLOWFM_INLINE V load(const float* p, Mask m) { return _mm256_maskload_ps(p, m); }
  static FLOWFM_INLINE V bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static FLOWFM_INLINE V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static FLOWFM_INLINE V add(V a, V b) { return _mm256_add_ps(a, b); }
  static FLOWFM_INLINE void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static FLOWFM_INLINE void store(float* p, V v, Mask m) { _mm256_maskstore_ps(p, m, v); }
};
constexpr int kGemmNV = 2;  // 6 x 2 accumulators of 16 registers
#endif
constexpr int kGemmMR = 6;
constexpr int64_t kGemmSmallMinRows = 2;  // = GEMM_SMALL_MIN_ROWS in flowfm_fast/ops/linear_act.py
constexpr int64_t kGemmPanel = kGemmNV * GemmVec::L;

// A's element (i, k) at a[i * r + k * k_]: rows of x (k_ = 1), or the columns of gu for dW (r = 1).
struct Strides {
  int64_t r, k;
};

// c[0:MR, 0:NV vectors] = bias (or zero) + a[0:MR, 0:K] b[0:K, 0:NV vectors], or c += that product
// when `accumulate` (summed in registers from zero, then added: a pass's K rows are one partial
// sum, which keeps a long reduction's rounding near a blocked BLAS's). The last vector under
// `last` unless FULL. Rows of b and c have strides ldb, ldc.
template <int MR, int NV, bool FULL>
FLOWFM_INLINE void gemm_tile(const float* __restrict a, Strides sa, const float* __restrict b, int64_t ldb,
                             float* __restrict c, int64_t ldc, int64_t K, const float* __restrict bias,
                             bool accumulate, typename GemmVec::Mask last) {
  using G = GemmVec;
  constexpr int L = G::L;
  auto load = [&](const float* p, int j) { return (FULL || j < NV - 1) ? G::load(p) : G::load(p, last); };
  typename G::V acc[MR][NV];
#pragma GCC unroll 8
  for (int j = 0; j < NV; ++j) {
    const typename G::V init = bias != nullptr && !accumulate ? load(bias + j * L, j) : G::zero();
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) acc[i][j] = init;
  }
  for (int64_t k = 0; k < K; ++k) {
    typename G::V bv[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) bv[j] = load(b + k * ldb + j * L, j);
    const float* ak = a + k * sa.k;
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const typename G::V av = G::bcast(ak + i * sa.r);
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[i][j] = G::fma(av, bv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) {
      if (accumulate) acc[i][j] = G::add(acc[i][j], load(c + i * ldc + j * L, j));
      if (FULL || j < NV - 1) G::store(c + i * ldc + j * L, acc[i][j]);
      else G::store(c + i * ldc + j * L, acc[i][j], last);
    }
}

// One tile with MR (1..kGemmMR) rows and NV (1..kGemmNV) vectors chosen at run time.
template <int MR = kGemmMR, int NV = kGemmNV>
FLOWFM_INLINE void gemm_tile_dispatch(int64_t mr, int64_t nv, bool full, const float* a, Strides sa,
                                      const float* b, int64_t ldb, float* c, int64_t ldc, int64_t K,
                                      const float* bias, bool accumulate, typename GemmVec::Mask last) {
  if constexpr (MR > 1) {
    if (mr < MR) return gemm_tile_dispatch<MR - 1, NV>(mr, nv, full, a, sa, b, ldb, c, ldc, K, bias, accumulate, last);
  }
  if constexpr (NV > 1) {
    if (nv < NV) return gemm_tile_dispatch<MR, NV - 1>(mr, nv, full, a, sa, b, ldb, c, ldc, K, bias, accumulate, last);
  }
  if (full) gemm_tile<MR, NV, true>(a, sa, b, ldb, c, ldc, K, bias, accumulate, last);
  else gemm_tile<MR, NV, false>(a, sa, b, ldb, c, ldc, K, bias, accumulate, last);
}

// dst[k][j] = w[j][k] for j < nw (<= kGemmPanel) rows of w (row stride ldw), k < K: a panel of Bt.
void pack_panel(const float* __restrict w, int64_t ldw, int64_t nw, int64_t K, float* __restrict dst) {
  constexpr int64_t T = GemmVec::L;
  int64_t j0 = 0;
  for (; j0 + T <= nw; j0 += T) {
    int64_t k0 = 0;
#if FLOWFM_CPU_AVX512
    for (; k0 + T <= K; k0 += T) transpose16(w + j0 * ldw + k0, ldw, dst + k0 * kGemmPanel + j0, kGemmPanel);
#else
    for (; k0 + T <= K; k0 += T) transpose8(w + j0 * ldw + k0, ldw, dst + k0 * kGemmPanel + j0, kGemmPanel);
#endif
    for (int64_t k = k0; k < K; ++k)
      for (int64_t j = j0; j < j0 + T; ++j) dst[k * kGemmPanel + j] = w[j * ldw + k];
  }
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = j0; j < nw; ++j) dst[k * kGemmPanel + j] = w[j * ldw + k];
}

// Rows of K per pass over a tile: a panel's kGemmKc x kGemmPanel block of Bt stays in L1 (32 KiB
// with AVX-512) while every row tile reads it; the tiles accumulate across passes.
constexpr int64_t kGemmKc = 128;
// Rows per block of a (a multiple of kGemmMR): its kGemmKc columns (36 KiB) stay in L2 while the
// block's tiles run through every pass over K, rather than every row of a being read from L3 once
// per pass.
constexpr int64_t kGemmMc = 72;

// u (M, N) = a (M, K, strides sa) Bt + bias, and y = ACT(u) when ACT != None (y and u rows of N).
// Bt is w (N, K) transposed (w_is_nk, row stride ldw) or w itself as K rows of N (stride ldw).
template <Act ACT>
void gemm_small(const float* a, Strides sa, int64_t M, int64_t K, const float* w, int64_t ldw, bool w_is_nk,
                int64_t N, const float* bias, float* u, float* y) {
  if (M <= 0 || N <= 0) return;  // nothing to write (and no task to split)
  const int64_t panels = (N + kGemmPanel - 1) / kGemmPanel;
  const int64_t row_tiles = (M + kGemmMR - 1) / kGemmMR;
  const int64_t threads = at::get_num_threads();
  // One tile: rows [m0, m0 + mr) of panel p over K rows [k0, k0 + kc) of Bt (bt: the panel's first column).
  auto tile = [&](int64_t p, const float* bt, int64_t ldb, int64_t m0, int64_t mr, int64_t k0, int64_t kc) {
    const int64_t n0 = p * kGemmPanel, nw = std::min(kGemmPanel, N - n0);
    const int64_t nv = (nw + GemmVec::L - 1) / GemmVec::L, tail = nw - (nv - 1) * GemmVec::L;
    gemm_tile_dispatch(mr, nv, tail == GemmVec::L, a + m0 * sa.r + k0 * sa.k, sa, bt + k0 * ldb, ldb,
                       u + m0 * N + n0, N, kc, bias != nullptr ? bias + n0 : nullptr, k0 > 0, GemmVec::mask(tail));
  };
  auto activate = [&](int64_t m_begin, int64_t m_end, int64_t n0, int64_t nw) {
    if constexpr (ACT != Act::None) {
      for (int64_t i = m_begin; i < m_end; ++i) {
        const float* __restrict ui = u + i * N + n0;
        act_store<ACT, float>(y + i * N + n0, static_cast<float*>(nullptr), nw, [&](int64_t q) { return ui[q]; });
      }
    }
  };
  auto k_blocks = [&](auto&& body) {  // [k0, k0 + kc) passes; one empty pass when K = 0 (u = bias)
    for (int64_t k0 = 0; k0 < K || k0 == 0; k0 += kGemmKc) body(k0, std::min(kGemmKc, K - k0));
  };
  // A task of at least ~64K multiply-adds: below, a second thread's wake-up costs more than it saves.
  auto grain_for = [](int64_t task_work) { return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, task_work)); };

  if (!w_is_nk) {
    // Bt read in place: tasks are bands of rows, each running every panel on an L1-sized block of a
    // (a narrow panel per task would read all of a once per panel: 8 times for dW's 128 AVX2 columns).
    const int64_t bands = std::min(row_tiles, threads), band_tiles = (row_tiles + bands - 1) / bands;
    at::parallel_for(0, bands, grain_for(band_tiles * kGemmMR * K * N), [&](int64_t b0, int64_t b1) {
      for (int64_t band = b0; band < b1; ++band) {
        const int64_t m_begin = band * band_tiles * kGemmMR, m_end = std::min(M, m_begin + band_tiles * kGemmMR);
        for (int64_t mb = m_begin; mb < m_end; mb += kGemmMc) {
          const int64_t mb_end = std::min(m_end, mb + kGemmMc);
          k_blocks([&](int64_t k0, int64_t kc) {
            for (int64_t p = 0; p < panels; ++p)
              for (int64_t m0 = mb; m0 < mb_end; m0 += kGemmMR)
                tile(p, w + p * kGemmPanel, ldw, m0, std::min<int64_t>(kGemmMR, mb_end - m0), k0, kc);
          });
          activate(mb, mb_end, 0, N);
        }
      }
    });
    return;
  }
  // Bt packed per panel: tasks are (panel, band of rows) pairs, enough of them to occupy every
  // thread; a task packs its panel once.
  const int64_t bands = std::min(row_tiles, std::max<int64_t>(1, (threads + panels - 1) / panels));
  const int64_t band_tiles = (row_tiles + bands - 1) / bands;
  at::parallel_for(0, panels * bands, grain_for(band_tiles * kGemmMR * K * kGemmPanel), [&](int64_t t0, int64_t t1) {
    // Not zero-filled: pack_panel writes the nw columns the tiles read (masked lanes are not read).
    const std::unique_ptr<float[]> packed(new float[static_cast<size_t>(std::max<int64_t>(K, 1) * kGemmPanel)]);
    int64_t packed_panel = -1;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p = t % panels, band = t / panels;
      const int64_t n0 = p * kGemmPanel, nw = std::min(kGemmPanel, N - n0);
      if (packed_panel != p) pack_panel(w + n0 * ldw, ldw, nw, K, packed.get());
      packed_panel = p;
      const int64_t m_begin = band * band_tiles * kGemmMR, m_end = std::min(M, m_begin + band_tiles * kGemmMR);
      for (int64_t mb = m_begin; mb < m_end; mb += kGemmMc) {
        const int64_t mb_end = std::min(m_end, mb + kGemmMc);
        k_blocks([&](int64_t k0, int64_t kc) {
          for (int64_t m0 = mb; m0 < mb_end; m0 += kGemmMR)
            tile(p, packed.get(), kGemmPanel, m0, std::min<int64_t>(kGemmMR, mb_end - m0), k0, kc);
        });
        activate(mb, mb_end, n0, nw);
      }
    }
  });
}
#endif

// a (M, K) b (N, K)^T + bias through gemm_small, with y = act(u) fused, when the problem is fp32,
// has kGemmSmallMinRows rows, is below kDnnMinWork unless any_size, and every operand has unit
// stride along its rows (b: along K, packed; or along N, read in place). Returns false, touching
// nothing, otherwise.
bool try_gemm_small(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias, Act act,
                    bool any_size, at::Tensor& u, at::Tensor& y) {
#if FLOWFM_CPU_AVX2
  if (a.scalar_type() != at::kFloat || b.scalar_type() != at::kFloat || a.dim() != 2 || b.dim() != 2) return false;
  const int64_t M = a.size(0), K = a.size(1), N = b.size(0);
  // One row is a matrix-vector product: packing the weight costs more than ATen's gemv takes.
  if (M < kGemmSmallMinRows || (M * K * N >= kDnnMinWork && !any_size) || a.stride(1) != 1 ||
      (bias.has_value() && bias->stride(0) != 1))
    return false;
  const bool b_is_nk = b.stride(1) == 1;
  if (!b_is_nk && b.stride(0) != 1) return false;
  u = at::empty({M, N}, a.options());
  y = act == Act::None ? u : at::empty({M, N}, a.options());
  const float* bias_p = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  dispatch_act(act, [&]<Act ACT>() {
    gemm_small<ACT>(a.data_ptr<float>(), {a.stride(0), 1}, M, K, b.data_ptr<float>(), b_is_nk ? b.stride(0) : b.stride(1),
                    b_is_nk, N, bias_p, u.data_ptr<float>(), y.data_ptr<float>());
  });
  return true;
#else
  (void)a, (void)b, (void)bias, (void)act, (void)any_size, (void)u, (void)y;
  return false;
#endif
}

// dW (N, K) = gu^T (N, M) x (M, K) through gemm_small, reading both in place: gu's columns are
// the broadcast operand (6 neighbours in a row of gu per step), x's rows the streamed one. fp32
// with unit-stride rows only; returns false otherwise.
bool try_gemm_weight_grad(const at::Tensor& gu, const at::Tensor& x, at::Tensor& dw) {
#if FLOWFM_CPU_AVX2
  if (gu.scalar_type() != at::kFloat || x.scalar_type() != at::kFloat || gu.stride(1) != 1 || x.stride(1) != 1)
    return false;
  const int64_t M = x.size(0), K = x.size(1), N = gu.size(1);
  dw = at::empty({N, K}, x.options());
  gemm_small<Act::None>(gu.data_ptr<float>(), {1, gu.stride(0)}, N, M, x.data_ptr<float>(), x.stride(0), false, K,
                        nullptr, dw.data_ptr<float>(), nullptr);
  return true;
#else
  (void)gu, (void)x, (void)dw;
  return false;
#endif
}

// a (M, K) times b (N, K) transposed, plus bias (N,): (M, N). Either operand may be a strided view
// (a transpose): oneDNN reads the weight's strides (and copies a strided input: see above), and
// at::mm reads both.
at::Tensor mm_nt(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias) {
  at::Tensor u, y;
  if (try_gemm_small(a, b, bias, Act::None, /*any_size=*/false, u, y)) return u;
  const auto& dnn = dnn_linear();
  if (dnn.has_value() && a.scalar_type() == at::kFloat && a.size(0) * a.size(1) * b.size(0) >= kDnnMinWork) {
    const bool transposed = a.stride(0) == 1 && a.stride(1) == a.size(0) && !a.is_contiguous();
    return dnn->call(transposed ? contiguous_transpose(a) : a, b, bias, "none",
                     c10::List<std::optional<at::Scalar>>(), std::nullopt);
  }
  return bias.has_value() ? at::addmm(*bias, a, b.t()) : at::mm(a, b.t());
}

template <Act ACT> void act_rows_fwd(const float* u, float* y, int64_t M, int64_t N) {
  at::parallel_for(0, M, grain_rows(N), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* __restrict ur = u + r * N;
      act_store<ACT, float>(y + r * N, static_cast<float*>(nullptr), N, [&](int64_t i) { return ur[i]; });
    }
  });
}

// gu = dy * act'(u), row by row (act' into gu, then the product while the row is in L1).
template <Act ACT> void act_rows_bwd(const float* dy, const float* u, float* gu, int64_t M, int64_t N) {
  at::parallel_for(0, M, grain_rows(N), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* __restrict g = gu + r * N;
      const float* __restrict d = dy + r * N;
      std::memcpy(g, u + r * N, sizeof(float) * N);
      act_inplace<ACT, true>(g, N);
#pragma omp simd
      for (int64_t i = 0; i < N; ++i) g[i] *= d[i];
    }
  });
}

at::Tensor act_forward(const at::Tensor& u, Act act) {
  if (u.scalar_type() != at::kFloat) {  // other dtypes: ATen's kernels, same formulas
    return act == Act::Silu ? at::silu(u) : at::gelu(u, "tanh");
  }
  at::Tensor y = at::empty_like(u);
  const int64_t N = u.size(-1), M = u.numel() / std::max<int64_t>(N, 1);
  dispatch_act(act, [&]<Act ACT>() { act_rows_fwd<ACT>(u.data_ptr<float>(), y.data_ptr<float>(), M, N); });
  return y;
}

at::Tensor act_backward(const at::Tensor& dy, const at::Tensor& u, Act act) {
  if (u.scalar_type() != at::kFloat) {
    return act == Act::Silu ? at::silu_backward(dy, u) : at::gelu_backward(dy, u, "tanh");
  }
  const at::Tensor d = dy.contiguous();
  at::Tensor gu = at::empty_like(u);
  const int64_t N = u.size(-1), M = u.numel() / std::max<int64_t>(N, 1);
  dispatch_act(act, [&]<Act ACT>() {
    act_rows_bwd<ACT>(d.data_ptr<float>(), u.data_ptr<float>(), gu.data_ptr<float>(), M, N);
  });
  return gu;
}

void check_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_cpu_float(x, "x");
  check_cpu_float(weight, "weight");
  TORCH_CHECK_VALUE(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
                    flowfm::msg("linear_act: x must be (M, K) and weight (N, K), got ", x.sizes(), " and ",
                                weight.sizes()));
  TORCH_CHECK_TYPE(x.scalar_type() == weight.scalar_type(), "linear_act: x and weight must have one dtype");
  if (bias.has_value()) {
    check_cpu_float(*bias, "bias");
    check_shape(*bias, {weight.size(0)}, "bias");
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "linear_act: bias must have x's dtype");
  }
}

// -> (y, u): u is the pre-activation when act != none (saved for the backward), else empty.
std::tuple<at::Tensor, at::Tensor> linear_act_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias, c10::string_view act_s) {
  check_args(x, weight, bias);
  const Act act = parse_act(act_s);
  {
    at::Tensor u, y;
    if (try_gemm_small(x, weight, bias, act, kGemmForwardAnySize, u, y))
      return {y, act == Act::None ? at::empty({0}, x.options()) : u};
  }
  // Contiguous u: the activation kernels walk rows, and the fake kernel promises this layout.
  at::Tensor u = mm_nt(x, weight, bias).contiguous();
  if (act == Act::None) return {u, at::empty({0}, x.options())};
  return {act_forward(u, act), u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_backward_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& u, c10::string_view act_s,
    bool need_x, bool need_weight, bool need_bias) {
  check_args(x, weight, std::nullopt);
  check_cpu_float(dy, "dy");
  check_shape(dy, {x.size(0), weight.size(0)}, "dy");
  const Act act = parse_act(act_s);
  if (act != Act::None) {
    check_shape(u, {x.size(0), weight.size(0)}, "u");
    TORCH_CHECK_TYPE(u.scalar_type() == x.scalar_type(), "linear_act: u must have x's dtype");
  }
  // Contiguous: the activation kernels walk rows, and a stride-0 dy (from y.sum()) is no GEMM operand.
  const at::Tensor gu = act == Act::None ? dy.to(x.scalar_type()).contiguous()
                                         : act_backward(dy.to(x.scalar_type()), u.contiguous(), act);
  at::Tensor dx, dw, db;
  if (need_x) dx = mm_nt(gu, weight.t(), std::nullopt).contiguous();  // gu (M, N) W (N, K)
  if (need_weight) {
    if (try_gemm_weight_grad(gu, x, dw)) {
    } else if constexpr (kDnnWeightGrad) {
      // gu^T (N, M) x (M, K): oneDNN was faster with the wider of N, K as its output columns
      // ((1920, 128) x (384, 128): 0.72 vs 1.0 ms the other way round).
      dw = weight.size(0) >= weight.size(1) ? mm_nt(x.t(), gu.t(), std::nullopt).t().contiguous()
                                            : mm_nt(gu.t(), x.t(), std::nullopt).contiguous();
    } else {
      dw = at::mm(gu.t(), x);
    }
  }
  if (need_bias) db = gu.sum(0);
  auto empty = [&] { return at::empty({0}, x.options()); };
  return {need_x ? dx : empty(), need_weight ? dw : empty(), need_bias ? db : empty()};
}
