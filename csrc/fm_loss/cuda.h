// Host launchers of fm_loss, defined in cuda.cu beside this file, under the
// contract in common/cuda_launch.h. CUDA headers only.
#pragma once
#include "../common/cuda_launch.h"

namespace flowfm::cuda {

// fm_loss: per_sample_b = mean_i (v - u)^2 (unweighted) with u = x1 - (1 - s) x0,
// loss = mean_b w_b per_sample_b (a single Acc value; w_b = 1 without weight), and, when dv is
// not nullptr, in the same pass dv = dloss/dv = 2 w_b (v - u) / (B n). V is v's storage type; X is x0/x1's
// (instantiated for V == X, and V = bf16/fp16 with X = float: the autocast case).
// partial: B * row_chunks(n) scratch.
template <typename V, typename X>
void fm_loss(const V* v, const X* x0, const X* x1, const Acc<X>* weight, Acc<X>* loss, Acc<X>* per_sample,
             Acc<X>* dv, Acc<X>* partial, int64_t B, int64_t n, double sigma_min, cudaStream_t stream);

}  // namespace flowfm::cuda
