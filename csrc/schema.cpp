// The op surface of flowfm_fast._C: every schema in one place. Kernels register per device in
// csrc/cpu/<op>.cpp (CPU) and csrc/cuda/<op>_binding.cpp (CUDA); fake (meta) kernels and validation
// live beside each op's reference in flowfm_fast/ops/<op>.py. Autograd: in C++, one file per op
// family (csrc/<family>_autograd.cpp), registered for every device; Python's register_autograd
// path cost ~50 us of host time a call, as much as the kernels at model sizes. (The Triton ops,
// defined in Python, keep Python formulas that these mirror.)
//
// Conventions: "kind" is "layer" | "rms" | "group"; "act" is "none" | "silu" | "gelu_tanh".
// mean/rstd are fp32 statistics saved for backward (float64 for float64 inputs). Gradients of
// absent optional inputs come back as empty tensors.
#include <torch/library.h>

#include "version.h"

TORCH_LIBRARY(flowfm, m) {
  m.def("abi_version() -> int");

  m.def("gated_residual(Tensor res, Tensor h, Tensor gate) -> Tensor");
  m.def("gated_residual_backward(Tensor dy, Tensor h, Tensor gate) -> (Tensor dh, Tensor dgate)");

  m.def("norm_modulate(Tensor x, Tensor? shift, Tensor? scale, Tensor? weight, Tensor? bias, str kind, "
        "float eps, str act, int num_groups) -> (Tensor y, Tensor mean, Tensor rstd)");
  m.def("norm_modulate_backward(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor? shift, Tensor? scale, "
        "Tensor? weight, Tensor? bias, str kind, str act, int num_groups) -> "
        "(Tensor dx, Tensor dshift, Tensor dscale, Tensor dweight, Tensor dbias)");

  m.def("gated_residual_norm_modulate(Tensor res, Tensor h, Tensor gate, Tensor? shift, Tensor? scale, "
        "Tensor? weight, Tensor? bias, str kind, float eps, str act) -> "
        "(Tensor new_res, Tensor y, Tensor mean, Tensor rstd)");
  m.def("gated_residual_norm_modulate_backward(Tensor? dnew_res, Tensor dy, Tensor new_res, Tensor h, "
        "Tensor gate, Tensor mean, Tensor rstd, Tensor? shift, Tensor? scale, Tensor? weight, Tensor? bias, "
        "str kind, str act) -> (Tensor dres, Tensor dh, Tensor dgate, Tensor dshift, Tensor dscale, "
        "Tensor dweight, Tensor dbias)");

  m.def("fm_interpolate(Tensor x0, Tensor x1, Tensor t, float sigma_min) -> (Tensor x_t, Tensor u_t)");
  m.def("fm_interpolate_backward(Tensor? dx_t, Tensor? du_t, Tensor x0, Tensor x1, Tensor t, "
        "float sigma_min) -> (Tensor dx0, Tensor dx1, Tensor dt)");

  // loss = mean_b w_b * mean(v - u)^2; with need_grad the same pass writes dv = dloss/dv (fp32).
  m.def("fm_loss(Tensor v, Tensor x0, Tensor x1, Tensor? weight, float sigma_min, bool need_grad) -> "
        "(Tensor loss, Tensor per_sample, Tensor dv)");

  m.def("timestep_embedding(Tensor t, int dim, float max_period) -> Tensor");
  m.def("timestep_embedding_backward(Tensor demb, Tensor t, int dim, float max_period) -> Tensor");

  // y = act(x W^T + b) for x (M, K), W (N, K); u = x W^T + b when act != "none" (saved for the
  // backward), else empty. Gradients not asked for come back empty.
  m.def("linear_act(Tensor x, Tensor weight, Tensor? bias, str act) -> (Tensor y, Tensor u)");
  m.def("linear_act_backward(Tensor dy, Tensor x, Tensor weight, Tensor u, str act, bool need_x, "
        "bool need_weight, bool need_bias) -> (Tensor dx, Tensor dweight, Tensor dbias)");

  // y = act(batch_norm(x)) for x (B, C) or (B, C, L), act "none" | "relu"; training: the batch's
  // per-channel statistics (var_unbiased returned for the caller's running estimate), else the running
  // ones. mean/rstd are what normalised x. The backward's dx is empty unless need_x.
  m.def("batch_norm_act(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
        "bool training, float eps, str act) -> (Tensor y, Tensor mean, Tensor rstd, Tensor var_unbiased)");
  m.def("batch_norm_act_backward(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias, "
        "bool training, str act, bool need_x) -> (Tensor dx, Tensor dweight, Tensor dbias)");

  // out = softmax(q k^T / sqrt(hd)) v per (batch, head), q / k / v (B, H, T, hd), no mask; with
  // need_probs, probs (B, H, T, T) in the accumulation dtype for the backward, else empty.
  m.def("attention(Tensor q, Tensor k, Tensor v, bool need_probs) -> (Tensor out, Tensor probs)");
  m.def("attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor probs) -> "
        "(Tensor dq, Tensor dk, Tensor dv)");

  m.def("euler_step_(Tensor(a!) x, Tensor v, float dt) -> ()");
  m.def("rk_combine(Tensor(a!) out, Tensor x, Tensor[] ks, float[] bs, float dt) -> ()");
}

TORCH_LIBRARY_IMPL(flowfm, CompositeExplicitAutograd, m) {
  m.impl("abi_version", []() -> int64_t { return FLOWFM_ABI_VERSION; });
}
