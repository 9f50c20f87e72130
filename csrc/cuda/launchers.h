// Host launchers of the raw-pointer CUDA kernels in csrc/cuda/*.cu. CUDA headers only (no torch),
// so the kernels compile with a bare `nvcc -c` and a non-torch program can call them too.
//
// Contract of every launcher:
// - pointers are device pointers to contiguous row-major buffers; sizes are element counts;
// - S is the storage type (float, double, __half, __nv_bfloat16) and Acc<S> the accumulation type
//   (float; double for double). Small per-sample / per-feature inputs (t, weight, shift, scale,
//   the norm's affine) and every statistic or reduced gradient are Acc<S>;
// - optional inputs/outputs are nullptr when absent;
// - work is queued on `stream` and nothing is synchronised; the caller checks cudaGetLastError()
//   afterwards (the torch bindings use C10_CUDA_KERNEL_LAUNCH_CHECK). Empty sizes launch nothing;
// - reductions never use float atomics: each block writes a partial whose position depends only
//   on the shape, and a second pass sums partials in a fixed order, so results are bitwise
//   reproducible run to run;
// - scratch buffers (`partial`, `*_part`) are provided by the caller, sized by the helper named
//   beside the launcher.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace flowfm::cuda {

template <typename S> struct AccT { using type = float; };
template <> struct AccT<double> { using type = double; };
template <typename S> using Acc = typename AccT<S>::type;

enum class Act : int { None = 0, Silu = 1, GeluTanh = 2 };

// ------------------------------------------------------------------------- per-sample rows
// fm_interpolate_backward and fm_loss reduce each sample's n elements. A row is split into
// row_chunks(n) chunks of kRowChunk elements, one block each; the split depends on n alone.
constexpr int64_t kRowChunk = 4096;
inline int64_t row_chunks(int64_t n) { return n <= 0 ? 1 : (n + kRowChunk - 1) / kRowChunk; }

// fm_interpolate: x_t = (1 - (1 - s) t_b) x0 + t_b x1, u_t = x1 - (1 - s) x0 for B rows of n.
template <typename S>
void fm_interpolate_forward(const S* x0, const S* x1, const Acc<S>* t, S* x_t, S* u_t, int64_t B, int64_t n,
                            double sigma_min, cudaStream_t stream);

// Its backward: dx0 = a_b dx_t - (1 - s) du_t, dx1 = t_b dx_t + du_t,
// dt_b = sum_i dx_t (x1 - (1 - s) x0) (zero when dx_t is absent). dx_t / du_t may be nullptr.
// partial: B * row_chunks(n) scratch.
template <typename S>
void fm_interpolate_backward(const S* dx_t, const S* du_t, const S* x0, const S* x1, const Acc<S>* t, S* dx0,
                             S* dx1, Acc<S>* dt, Acc<S>* partial, int64_t B, int64_t n, double sigma_min,
                             cudaStream_t stream);

// fm_loss: per_sample_b = mean_i (v - u)^2 (unweighted) with u = x1 - (1 - s) x0,
// loss = mean_b w_b per_sample_b (a single Acc value; w_b = 1 without weight), and, when dv is
// not nullptr, in the same pass dv = dloss/dv = 2 w_b (v - u) / (B n). V is v's storage type; X is x0/x1's
// (instantiated for V == X, and V = bf16/fp16 with X = float: the autocast case).
// partial: B * row_chunks(n) scratch.
template <typename V, typename X>
void fm_loss(const V* v, const X* x0, const X* x1, const Acc<X>* weight, Acc<X>* loss, Acc<X>* per_sample,
             Acc<X>* dv, Acc<X>* partial, int64_t B, int64_t n, double sigma_min, cudaStream_t stream);

// ------------------------------------------------------------------------- integrator updates
// x += dt * v in place (v may alias x). V is S, or Acc<S> for a v of another dtype (promoted
// exactly by the caller rather than rounded to x's dtype).
template <typename S, typename V> void euler_step(S* x, const V* v, int64_t n, double dt, cudaStream_t stream);

// out = x + sum_i coef_i * k_i, accumulated in Acc<S> in stage order (k_0 first) and rounded
// once; coef_i = dt * b_i is formed by the caller in double. out may alias x or any k_i. Any
// number of stages: more than kMaxStages run as several passes (rounding once per pass).
constexpr int kMaxStages = 8;
template <typename S>
void rk_combine(S* out, const S* x, const S* const* ks, const double* coefs, int num_stages, int64_t n,
                cudaStream_t stream);

// ------------------------------------------------------------------------- norm_modulate
// y = act((xhat * w + bias) * (1 + scale) + shift), xhat = (x - mean) * rstd (rms: mean = 0).
// Modulation (shift, scale) is per sample: (B, D) over T for tokens, (B, C) over L for groups.
// Any of the four may be nullptr (zeros for shift/scale/bias, ones for w).
template <typename A> struct Modulation {
  const A* shift;
  const A* scale;
  const A* weight;
  const A* bias;
};

// Tokens: x (B, T, D) (rows (N, D) are B = N, T = 1). mean/rstd: (B * T).
template <typename S>
void norm_modulate_tokens_forward(const S* x, S* y, Acc<S>* mean, Acc<S>* rstd, int64_t B, int64_t T, int64_t D,
                                  bool rms, double eps, Act act, Modulation<Acc<S>> mod, cudaStream_t stream);

// GroupNorm: x (B, C, L), G groups of C / G contiguous channels. mean/rstd: (B, G).
template <typename S>
void norm_modulate_group_forward(const S* x, S* y, Acc<S>* mean, Acc<S>* rstd, int64_t B, int64_t C, int64_t L,
                                 int64_t G, double eps, Act act, Modulation<Acc<S>> mod, cudaStream_t stream);

// Parameter gradients of the backward passes, Acc<S>, each nullptr when not wanted: dshift and
// dscale (B, F), dweight and dbias (F,), F = D or C. dw_part / db_part: scratch of
// norm_modulate_partials(...) * F each (needed when dweight / dbias is wanted).
template <typename A> struct ModulationGrads {
  A* dshift;
  A* dscale;
  A* dweight;
  A* dbias;
};
constexpr int64_t kMaxTokenSegments = 256;
inline int64_t norm_modulate_partials(bool group, int64_t B) {
  return group ? B : (B < kMaxTokenSegments ? B : kMaxTokenSegments);
}

template <typename S>
void norm_modulate_tokens_backward(const S* dy, const S* x, const Acc<S>* mean, const Acc<S>* rstd, S* dx,
                                   int64_t B, int64_t T, int64_t D, bool rms, Act act, Modulation<Acc<S>> mod,
                                   ModulationGrads<Acc<S>> grads, Acc<S>* dw_part, Acc<S>* db_part, cudaStream_t stream);

template <typename S>
void norm_modulate_group_backward(const S* dy, const S* x, const Acc<S>* mean, const Acc<S>* rstd, S* dx,
                                  int64_t B, int64_t C, int64_t L, int64_t G, Act act, Modulation<Acc<S>> mod,
                                  ModulationGrads<Acc<S>> grads, Acc<S>* dw_part, Acc<S>* db_part, cudaStream_t stream);

}  // namespace flowfm::cuda
