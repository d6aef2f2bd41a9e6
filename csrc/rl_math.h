// Branch-free scalar helpers for the RL-math CPU kernels (ppo_loss.cpp, value_loss.cpp): loops built
// from them vectorise under `#pragma omp simd`, where std::min/std::max (references) and selects on
// computed floats kept GCC 12 from if-converting them. Header-only, always inlined.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu_math.h"  // minf, maxf, exp_any

namespace rlhf {

constexpr float kInfF = std::numeric_limits<float>::infinity();

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
