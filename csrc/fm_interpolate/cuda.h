// Host launchers of fm_interpolate, defined in cuda.cu beside this file, under the
// contract in common/cuda_launch.h. CUDA headers only.
#pragma once
#include "../common/cuda_launch.h"

namespace flowfm::cuda {

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

}  // namespace flowfm::cuda
