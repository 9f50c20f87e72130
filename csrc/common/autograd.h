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
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

inline OptT opt(const at::Tensor& t) { return t.defined() ? OptT(t) : std::nullopt; }
inline at::Tensor or_undefined(const OptT& t) { return t.has_value() ? *t : at::Tensor(); }

// Looked up once per call site (hold it in a function-local static).
template <typename Sig> c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The backward kernels have no derivative of their own. With create_graph=True (grad mode on inside
// backward) torch's fallback for them would warn and hand back zero second-order gradients: raise.
inline void first_order_only(const char* op, const torch::autograd::variable_list& grads,
                             const torch::autograd::variable_list& saved) {
  if (!at::GradMode::is_enabled()) return;
  auto any_requires_grad = [](const torch::autograd::variable_list& ts) {
    for (const auto& t : ts)
      if (t.defined() && t.requires_grad()) return true;
    return false;
  };
  TORCH_CHECK(!any_requires_grad(grads) && !any_requires_grad(saved), op,
              " has no derivative in the cpp / cuda backends (double backward, create_graph=True): compute "
              "higher-order gradients with flowfm_fast.ops.use_backend('torch')");
}

}  // namespace flowfm
