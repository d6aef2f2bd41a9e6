// kernels.masked_whiten on CPU, the math of kernels/whiten.py: two exact passes over the valid
// tokens in double (mean, then squared deviations), then (x - mean) * rsqrt(var + eps). Fixed
// kChunk chunks added in order, so the result does not depend on the thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_math.h"

namespace rlhf {
namespace {

at::Tensor masked_whiten(const at::Tensor& x, const at::Tensor& m, bool shift_mean, double eps) {
  TORCH_CHECK(x.is_contiguous() && m.is_contiguous() && x.numel() == m.numel(),
              "masked_whiten: x and mask must be contiguous with one mask entry per element");
  TORCH_CHECK(m.scalar_type() == at::kByte, "masked_whiten: mask must be uint8");
  TORCH_CHECK(x.device().is_cpu(), "masked_whiten (cpp): tensors must be on CPU");
  const int64_t N = x.numel(), n_chunks = (N + kChunk - 1) / kChunk;
  at::Tensor out = at::empty({N}, x.options().dtype(at::kFloat));
  float* out_p = out.data_ptr<float>();
  const uint8_t* m_p = m.const_data_ptr<uint8_t>();
  std::vector<double> cnt(n_chunks), sum(n_chunks), m2(n_chunks);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "masked_whiten", [&] {
    const scalar_t* x_p = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        double n = 0, s = 0;
        for (int64_t i = c * kChunk, e = std::min(N, (c + 1) * kChunk); i < e; ++i) {
          if (m_p[i] == 0) continue;
          n += 1;
          s += to_f32(x_p[i]);
        }
        cnt[c] = n;
        sum[c] = s;
      }
    });
    double n = 0, s = 0;
    for (int64_t c = 0; c < n_chunks; ++c) {
      n += cnt[c];
      s += sum[c];
    }
    const double mean = n > 0 ? s / n : 0.0;
    at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        double acc = 0;
        for (int64_t i = c * kChunk, e = std::min(N, (c + 1) * kChunk); i < e; ++i) {
          if (m_p[i] == 0) continue;
          const double d = static_cast<double>(to_f32(x_p[i])) - mean;
          acc += d * d;
        }
        m2[c] = acc;
      }
    });
    double total_m2 = 0;
    for (int64_t c = 0; c < n_chunks; ++c) total_m2 += m2[c];
    const double var = total_m2 / std::max(n - 1.0, 1.0);  // n <= 1: var = 0 (see kernels/whiten.py)
    const float rstd = static_cast<float>(1.0 / std::sqrt(var + eps));
    const float mean_f = static_cast<float>(mean), add = shift_mean ? 0.f : mean_f;
    at::parallel_for(0, N, kChunk, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        out_p[i] = m_p[i] != 0 ? (to_f32(x_p[i]) - mean_f) * rstd + add : 0.f;
    });
  });
  return out;
}

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_FRAGMENT(rlhf_kernels, m) {
  m.def("masked_whiten(Tensor x, Tensor mask, bool shift_mean, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) { m.impl("masked_whiten", &rlhf::masked_whiten); }
