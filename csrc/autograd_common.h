// What the C++ autograd functions of csrc/*_autograd.cpp share: a typed handle of a flowfm op (called
// below the autograd key), and optional tensors to and from the undefined tensors autograd saves.
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>

namespace flowfm {

using OptT = std::optional<at::Tensor>;

inline OptT opt(const at::Tensor& t) { return t.defined() ? OptT(t) : std::nullopt; }
inline at::Tensor or_undefined(const OptT& t) { return t.has_value() ? *t : at::Tensor(); }

// Looked up once per call site (hold it in a function-local static).
template <typename Sig> c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

}  // namespace flowfm
