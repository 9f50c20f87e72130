// gated_residual: y = res + gate[b] * h, gate (B, D) broadcast over T (rows (N, D): T = 1).
// Forward is one pass over res and h; backward writes dh = dy * gate and dgate[b] = sum_t dy * h
// with each b owned by one task, so results do not depend on the thread count.
#include "common.h"

namespace flowfm::cpu {
namespace {

struct Dims { int64_t B, T, D; };
Dims dims_of(const at::Tensor& res) {
  return res.dim() == 3 ? Dims{res.size(0), res.size(1), res.size(2)} : Dims{res.size(0), 1, res.size(1)};
}

template <typename scalar_t>
void forward_kernel(const scalar_t* r, const scalar_t* hp, const acc_t<scalar_t>* g, scalar_t* y, Dims d) {
  using A = acc_t<scalar_t>;
  at::parallel_for(0, d.B * d.T, grain_rows(d.D), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const A* gr = g + (row / d.T) * d.D;
      const int64_t o = row * d.D;
#pragma omp simd
      for (int64_t i = 0; i < d.D; ++i)
        y[o + i] = static_cast<scalar_t>(static_cast<A>(r[o + i]) + gr[i] * static_cast<A>(hp[o + i]));
    }
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* dyp, const scalar_t* hp, const acc_t<scalar_t>* g, scalar_t* dhp,
                     acc_t<scalar_t>* dg, Dims d) {
  using A = acc_t<scalar_t>;
  at::parallel_for(0, d.B, grain_rows(d.T * d.D), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const A* gb = g + b * d.D;
      A* dgb = dg + b * d.D;
      for (int64_t i = 0; i < d.D; ++i) dgb[i] = A(0);
      for (int64_t t = 0; t < d.T; ++t) {
        const int64_t o = (b * d.T + t) * d.D;
#pragma omp simd
        for (int64_t i = 0; i < d.D; ++i) {
          const A dyv = static_cast<A>(dyp[o + i]);
          dhp[o + i] = static_cast<scalar_t>(dyv * gb[i]);
          dgb[i] += dyv * static_cast<A>(hp[o + i]);
        }
      }
    }
  });
}

at::Tensor gated_residual_cpu(const at::Tensor& res_in, const at::Tensor& h_in, const at::Tensor& gate_in) {
  check_cpu_float(res_in, "res");
  check_cpu_float(h_in, "h");
  check_cpu_float(gate_in, "gate");
  TORCH_CHECK_VALUE(res_in.dim() == 2 || res_in.dim() == 3, "res must be (B, T, D) or (N, D)");
  check_shape(h_in, res_in.sizes(), "h");
  const Dims d = dims_of(res_in);
  check_shape(gate_in, {d.B, d.D}, "gate");
  auto res = res_in.contiguous();
  auto h = h_in.to(res.scalar_type()).contiguous();
  auto gate = gate_in.to(acc_dtype(res.scalar_type())).contiguous();
  auto out = at::empty_like(res);
  FLOWFM_DISPATCH_FLOATS(res.scalar_type(), "gated_residual", [&] {
    forward_kernel<scalar_t>(res.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), gate.data_ptr<acc_t<scalar_t>>(),
                             out.data_ptr<scalar_t>(), d);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gated_residual_backward_cpu(const at::Tensor& dy_in, const at::Tensor& h_in,
                                                               const at::Tensor& gate_in) {
  check_cpu_float(dy_in, "dy");
  check_cpu_float(h_in, "h");
  check_cpu_float(gate_in, "gate");
  check_shape(dy_in, h_in.sizes(), "dy");
  const Dims d = dims_of(h_in);
  check_shape(gate_in, {d.B, d.D}, "gate");
  auto h = h_in.contiguous();
  auto dy = dy_in.to(h.scalar_type()).contiguous();
  auto gate = gate_in.to(acc_dtype(h.scalar_type())).contiguous();
  auto dh = at::empty_like(h);
  auto dgate = at::empty({d.B, d.D}, gate.options());
  FLOWFM_DISPATCH_FLOATS(h.scalar_type(), "gated_residual_backward", [&] {
    backward_kernel<scalar_t>(dy.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), gate.data_ptr<acc_t<scalar_t>>(),
                              dh.data_ptr<scalar_t>(), dgate.data_ptr<acc_t<scalar_t>>(), d);
  });
  return {dh, dgate.to(gate_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(flowfm, CPU, m) {
  m.impl("gated_residual", &gated_residual_cpu);
  m.impl("gated_residual_backward", &gated_residual_backward_cpu);
}

}  // namespace flowfm::cpu
