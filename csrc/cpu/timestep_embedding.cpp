// timestep_embedding: emb[n] = [cos(t_n f_k), sin(t_n f_k)], f_k = max_period^(-k / half),
// k < half = dim / 2 (an odd dim gets one zero column). Output fp32.
// Forward: the reference's fp32 arithmetic, fused into one output (no cat). Backward (rarely
// needed: t is data, not a parameter) evaluates in float64: dt_n = sum_k f_k (cos(a) * demb_sin - sin(a) * demb_cos).
#include <vector>

#include "common.h"

namespace flowfm::cpu {
namespace {

std::vector<double> freqs(int64_t half, double max_period) {
  std::vector<double> f(half);
  for (int64_t k = 0; k < half; ++k) f[k] = std::exp(-std::log(max_period) * double(k) / double(half));
  return f;
}

void check_args(const at::Tensor& t, int64_t dim, double max_period) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "t must be a CPU tensor for the cpp backend");
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()) || at::isIntegralType(t.scalar_type(), false),
                   flowfm::msg("t must be a float or integer tensor, got ", t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == 1, flowfm::msg("t must be (N,), got ", t.sizes()));
  TORCH_CHECK_VALUE(dim >= 1, flowfm::msg("dim must be >= 1, got ", dim));
  TORCH_CHECK_VALUE(max_period > 0, flowfm::msg("max_period must be > 0, got ", max_period));
}

at::Tensor timestep_embedding_cpu(const at::Tensor& t_in, int64_t dim, double max_period) {
  check_args(t_in, dim, max_period);
  const int64_t N = t_in.size(0), half = dim / 2;
  auto emb = at::empty({N, dim}, t_in.options().dtype(at::kFloat));
  if (dim % 2) emb.select(1, dim - 1).zero_();
  if (half == 0) return emb;
  // The reference's arithmetic exactly (fp32 t, fp32 frequencies, fp32 products), with cos/sin
  // from ATen's vectorised (SLEEF) kernels written straight into the two halves of the output:
  // scalar libm sin/cos of float64 arguments measured 4x slower than the unfused reference.
  const auto f = freqs(half, max_period);
  auto freq = at::empty({half}, emb.options());
  float* fp = freq.data_ptr<float>();
  for (int64_t k = 0; k < half; ++k) fp[k] = static_cast<float>(f[k]);
  auto args = at::outer(t_in.to(at::kFloat), freq);
  auto cos_half = emb.narrow(1, 0, half), sin_half = emb.narrow(1, half, half);
  at::cos_out(cos_half, args);
  at::sin_out(sin_half, args);
  return emb;
}

at::Tensor timestep_embedding_backward_cpu(const at::Tensor& demb_in, const at::Tensor& t_in, int64_t dim,
                                           double max_period) {
  check_args(t_in, dim, max_period);
  const int64_t N = t_in.size(0), half = dim / 2;
  check_shape(demb_in, {N, dim}, "demb");
  auto t = t_in.to(at::kFloat).to(at::kDouble).contiguous();
  auto demb = demb_in.to(at::kDouble).contiguous();
  auto dt = at::empty({N}, t.options());
  const auto f = freqs(half, max_period);
  const double *tp = t.data_ptr<double>(), *g = demb.data_ptr<double>();
  double* out = dt.data_ptr<double>();
  at::parallel_for(0, N, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, dim)), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const double* row = g + n * dim;
      double acc = 0.0;
      for (int64_t k = 0; k < half; ++k) {
        const double a = tp[n] * f[k];
        acc += f[k] * (std::cos(a) * row[half + k] - std::sin(a) * row[k]);
      }
      out[n] = acc;
    }
  });
  return dt.to(at::isFloatingType(t_in.scalar_type()) ? t_in.scalar_type() : at::kFloat);
}

}  // namespace

TORCH_LIBRARY_IMPL(flowfm, CPU, m) {
  m.impl("timestep_embedding", &timestep_embedding_cpu);
  m.impl("timestep_embedding_backward", &timestep_embedding_backward_cpu);
}

}  // namespace flowfm::cpu
