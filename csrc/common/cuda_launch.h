// What every CUDA launcher shares (csrc/<op>/cuda.h declares each op's launchers, csrc/<op>/cuda.cu
// defines them). CUDA headers only (no torch), so the kernels compile with a bare `nvcc -c` and a
// non-torch program can call them too.
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

}  // namespace flowfm::cuda
