// Shared helpers for the CPU kernels: a vectorisable exp, strided [A, R, V] row addressing, and
// a chunked fp32 loader. Header-only; every csrc/*.cpp may include it.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace rlhf {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Value-based min/max: std::min/std::max return references, and selecting between addresses stops
// GCC 12 from if-converting (and so vectorising) the loops that call them.
__attribute__((always_inline)) inline float minf(float a, float b) { return a < b ? a : b; }
__attribute__((always_inline)) inline float maxf(float a, float b) { return a > b ? a : b; }

// e^xc = 2^n e^r for xc in [-87.3, 88.72]: Cody-Waite reduction xc = n ln2 + r, |r| <= ln2/2, and a
// degree-7 polynomial for e^r (Cephes expf coefficients). Returns e^r; n comes back through `n`.
// Branch-free so `#pragma omp simd` loops vectorise it.
__attribute__((always_inline)) inline float exp_reduced(float xc, float& n) {
  // round to nearest by adding and subtracting 1.5 * 2^23 (vectorises, unlike nearbyint)
  n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

// 2^(n + bias - 127) from the exponent bits (n + bias in [1, 254]).
__attribute__((always_inline)) inline float pow2_biased(float n, int32_t bias) {
  const int32_t bits = (static_cast<int32_t>(n) + bias) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return scale;
}

// exp(x) for x <= 0 (the only range the softmax kernels need: x - max, logp). Measured against double
// exp over every float in [-87, 0] (1.1e9 values, 2026-11-24): max relative error 8.3e-8 (< 1 ulp).
// Returns exactly 0 below -87.3 (where e^x is subnormal) and for -inf; NaN stays NaN.
__attribute__((always_inline)) inline float exp_nonpos(float x) {
  float n;
  const float p = exp_reduced(x < -87.3f ? -87.3f : x, n);
  const float y = p * pow2_biased(n, 127);
  return x < -87.3f ? 0.0f : y;
}

// exp(x) for any x (the RL-math kernels: ratios exp(logprobs - old_logprobs)): 2^n split as
// 2^(n-1) * 2 so n = 128 (x up to 88.72) stays finite. 0 below -87.3, inf above 88.72.
__attribute__((always_inline)) inline float exp_any(float x) {
  float n;
  const float p = exp_reduced(minf(maxf(x, -87.3f), 88.72f), n);
  const float y = p * pow2_biased(n, 126) * 2.0f;
  return x < -87.3f ? 0.0f : (x > 88.72f ? std::numeric_limits<float>::infinity() : y);
}

// Row n of an [A, R, V] strided view starts at (n / R) * s0 + (n % R) * s1.
template <typename T>
inline const T* row_ptr(const at::Tensor& rows3, int64_t n) {
  const int64_t R = rows3.size(1);
  return rows3.const_data_ptr<T>() + (n / R) * rows3.stride(0) + (n % R) * rows3.stride(1);
}

template <typename T>
inline float to_f32(T v) {
  return static_cast<float>(v);
}

// Load `len` elements (stride `sv`) starting at `src`, scaled by `scale`, into fp32 `dst`.
template <typename T>
inline void load_scaled(const T* src, int64_t sv, int64_t len, float scale, float* dst) {
  if (sv == 1) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) dst[i] = to_f32(src[i]) * scale;
  } else {
    for (int64_t i = 0; i < len; ++i) dst[i] = to_f32(src[i * sv]) * scale;
  }
}

// Elements per chunk: 16 KiB of fp32 scratch on the stack, well inside L1+L2.
constexpr int64_t kChunk = 4096;

inline void check_rows3(const at::Tensor& rows3, const char* op) {
  TORCH_CHECK(rows3.dim() == 3, op, ": expected an [A, R, V] view, got ", rows3.dim(), " dims");
  TORCH_CHECK(rows3.scalar_type() == at::kFloat || rows3.scalar_type() == at::kBFloat16 ||
                  rows3.scalar_type() == at::kHalf,
              op, ": logits must be float32/bfloat16/float16, got ", rows3.scalar_type());
}

}  // namespace rlhf
