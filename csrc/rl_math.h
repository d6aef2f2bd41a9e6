// Branch-free scalar helpers for the RL-math CPU kernels (ppo_loss.cpp, value_loss.cpp): loops built
// from them vectorise under `#pragma omp simd`, where std::min/std::max (references) and selects on
// computed floats kept GCC 12 from if-converting them. Header-only, always inlined.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace rlhf {

constexpr float kInfF = std::numeric_limits<float>::infinity();

// Value-based min/max: std::min/std::max return references, and selecting between addresses stops
// GCC 12 from if-converting (and so vectorising) the loops that call them.
__attribute__((always_inline)) inline float minf(float a, float b) { return a < b ? a : b; }
__attribute__((always_inline)) inline float maxf(float a, float b) { return a > b ? a : b; }

// exp(x) for any x, branch-free so `#pragma omp simd` loops vectorise it (std::exp does not, without
// -ffast-math): exp_nonpos's Cody-Waite reduction and Cephes polynomial (cpu_math.h), with 2^n split
// as 2^(n-1) * 2 so n = 128 (x up to 88.72) stays finite. 0 below -87.3, inf above 88.72.
__attribute__((always_inline)) inline float exp_any(float x) {
  const float xc = minf(maxf(x, -87.3f), 88.72f);
  // round to nearest by the 1.5 * 2^23 trick: std::nearbyint is a libm call (no SSE4.1 roundps in
  // the x86-64 baseline) and would stop the loop from vectorising
  const float n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 126) << 23;
  float half_scale;
  std::memcpy(&half_scale, &bits, sizeof(half_scale));
  const float y = p * half_scale * 2.0f;
  return x < -87.3f ? 0.0f : (x > 88.72f ? kInfF : y);
}

// Zero `x` where `keep` is false by masking its bits (x may be NaN/inf padding: x * 0 would be NaN).
__attribute__((always_inline)) inline float keep_if(float x, bool keep) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  bits &= 0u - static_cast<uint32_t>(keep);
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

}  // namespace rlhf
