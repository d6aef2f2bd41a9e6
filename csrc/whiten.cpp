// kernels.masked_whiten on CPU, the math of kernels/whiten.py: two exact passes over the valid
// tokens in double (mean, then squared deviations), then (x - mean) * rsqrt(var + eps). Fixed
// kChunk chunks added in order, so the result does not depend on the thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_math.h"
#include "rl_math.h"

namespace rlhf {
namespace {

// Per-chunk passes as templates (`omp simd` cannot sit inside the AT_DISPATCH lambda). Masked
// elements are zeroed by bit masks (they may hold NaN/inf padding), so the loops are branch-free.
template <typename T>
__attribute__((noinline)) void chunk_count_sum(const T* x, const uint8_t* m, int64_t n, double& cnt, double& sum) {
  double c = 0, s = 0;
#pragma omp simd reduction(+ : c, s)
  for (int64_t i = 0; i < n; ++i) {
    c += static_cast<double>(m[i] != 0);
    s += static_cast<double>(keep_if(to_f32(x[i]), m[i] != 0));
  }
  cnt = c;
  sum = s;
}

template <typename T>
__attribute__((noinline)) double chunk_m2(const T* x, const uint8_t* m, int64_t n, double mean) {
  double acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    const bool valid = m[i] != 0;
    const double d = valid ? static_cast<double>(keep_if(to_f32(x[i]), valid)) - mean : 0.0;
    acc += d * d;
  }
  return acc;
}

template <typename T>
__attribute__((noinline)) void chunk_apply(const T* x, const uint8_t* m, int64_t n, float mean, float rstd, float add,
                                           float* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const bool valid = m[i] != 0;
    out[i] = keep_if((keep_if(to_f32(x[i]), valid) - mean) * rstd + add, valid);
  }
}

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
        const int64_t start = c * kChunk;
        chunk_count_sum(x_p + start, m_p + start, std::min(N, start + kChunk) - start, cnt[c], sum[c]);
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
        const int64_t start = c * kChunk;
        m2[c] = chunk_m2(x_p + start, m_p + start, std::min(N, start + kChunk) - start, mean);
      }
    });
    double total_m2 = 0;
    for (int64_t c = 0; c < n_chunks; ++c) total_m2 += m2[c];
    const double var = total_m2 / std::max(n - 1.0, 1.0);  // n <= 1: var = 0 (see kernels/whiten.py)
    const float rstd = static_cast<float>(1.0 / std::sqrt(var + eps));
    const float mean_f = static_cast<float>(mean), add = shift_mean ? 0.f : mean_f;
    at::parallel_for(0, N, kChunk, [&](int64_t begin, int64_t end) {
      chunk_apply(x_p + begin, m_p + begin, end - begin, mean_f, rstd, add, out_p + begin);
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
