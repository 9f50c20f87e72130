// Shared pieces of the CUDA torch bindings (csrc/cuda/*_binding.cpp): argument checks naming the
// argument, the storage-type dispatch onto the raw-pointer launchers of launchers.h, and the
// current stream. Compiled by the host compiler only in the CUDA build (FLOWFM_WITH_CUDA).
//
// The stream comes from c10::cuda::getCurrentCUDAStream, the function at::cuda::getCurrentCUDAStream
// forwards to; ATen/cuda/CUDAContext.h is avoided because it pulls in cuBLAS/cuSPARSE headers
// that a toolkit without those libraries lacks (and the bindings need none of it).
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>
#include <type_traits>

#include "cuda_launch.h"
#include "messages.h"

namespace flowfm::cuda::binding {

inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// A float tensor on `device` (the device of the op's main input).
inline void check_cuda_float(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK_VALUE(t.defined(), flowfm::msg(name, " must be a tensor"));
  TORCH_CHECK_VALUE(t.device().is_cuda(), flowfm::msg(name, " must be a CUDA tensor for the cuda backend, got ", t.device()));
  TORCH_CHECK_VALUE(t.device() == device, flowfm::msg(name, " is on ", t.device(), " but the op runs on ", device));
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()),
                   flowfm::msg(name, " must be a float tensor, got ", t.scalar_type()));
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == shape, flowfm::msg(name, " must have shape ", shape, ", got ", t.sizes()));
}

// Optional small tensors (t, weight, modulation, affine) converted once to the accumulation dtype.
inline at::Tensor small_acc(const c10::optional<at::Tensor>& t, at::ScalarType acc) {
  return t.has_value() && t->defined() ? t->to(acc).contiguous() : at::Tensor();
}

template <typename A> inline const A* cptr_or_null(const at::Tensor& t) {
  return t.defined() ? static_cast<const A*>(t.const_data_ptr()) : nullptr;
}
template <typename A> inline A* ptr_or_null(at::Tensor& t) {
  return t.defined() ? static_cast<A*>(t.data_ptr()) : nullptr;
}
// at::Half / at::BFloat16 / float / double share their layout with __half / __nv_bfloat16 /
// float / double, so tensor storage is handed to the kernels by reinterpretation.
template <typename S> inline const S* cptr(const at::Tensor& t) { return static_cast<const S*>(t.const_data_ptr()); }
template <typename S> inline S* ptr(at::Tensor& t) { return static_cast<S*>(t.data_ptr()); }

// Grid sizes are unsigned ints: refuse shapes whose block count would overflow one.
inline void check_row_grid(int64_t rows, int64_t n, const char* op) {
  TORCH_CHECK_VALUE(rows * row_chunks(n) < (int64_t{1} << 31), flowfm::msg(op, ": tensor too large for the cuda backend"));
}

template <typename S> struct Tag { using type = S; };

// f(Tag<S>{}) with S the kernel storage type of `st`.
template <typename F> void dispatch_storage(at::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case at::kFloat: f(Tag<float>{}); break;
    case at::kDouble: f(Tag<double>{}); break;
    case at::kHalf: f(Tag<__half>{}); break;
    case at::kBFloat16: f(Tag<__nv_bfloat16>{}); break;
    default: TORCH_CHECK_TYPE(false, flowfm::msg(op, ": unsupported dtype ", st));
  }
}

inline Act parse_act(c10::string_view s) {
  if (s == "none") return Act::None;
  if (s == "silu") return Act::Silu;
  if (s == "gelu_tanh") return Act::GeluTanh;
  TORCH_CHECK_VALUE(false, flowfm::msg("act must be 'none', 'silu' or 'gelu_tanh', got '", std::string(s), "'"));
}

enum class Kind { Layer, Rms, Group };
inline Kind parse_kind(c10::string_view s) {
  if (s == "layer") return Kind::Layer;
  if (s == "rms") return Kind::Rms;
  if (s == "group") return Kind::Group;
  TORCH_CHECK_VALUE(false, flowfm::msg("kind must be 'layer', 'rms' or 'group', got '", std::string(s), "'"));
}

}  // namespace flowfm::cuda::binding
