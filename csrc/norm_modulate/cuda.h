// Host launchers of norm_modulate, defined in cuda.cu beside this file, under the
// contract in common/cuda_launch.h. CUDA headers only.
#pragma once
#include "../common/cuda_launch.h"

namespace flowfm::cuda {

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
