// kernels.gae on CPU: the masked GAE recurrence of kernels/gae.py, one reverse pass per row, rows
// split across threads with at::parallel_for. Math in fp32 (the same as the Triton/CUDA kernels);
// inputs any strides and float dtype, outputs fp32 contiguous.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "cpu_math.h"

namespace rlhf {
namespace {

// One row, backwards. (next_adv, next_value) is the state at the first valid position after t;
// a masked position leaves it untouched and writes zeros.
template <typename T>
void gae_row(const T* r, int64_t sr, const T* v, int64_t sv, const uint8_t* m, int64_t sm, int64_t n_t, float gamma,
             float c, float* adv, float* ret) {
  float next_adv = 0.f, next_value = 0.f;
  for (int64_t t = n_t - 1; t >= 0; --t) {
    if (m[t * sm] == 0) {
      adv[t] = 0.f;
      ret[t] = 0.f;
      continue;
    }
    const float vt = to_f32(v[t * sv]);
    const float a = to_f32(r[t * sr]) + gamma * next_value - vt + c * next_adv;
    adv[t] = a;
    ret[t] = a + vt;
    next_adv = a;
    next_value = vt;
  }
}

std::tuple<at::Tensor, at::Tensor> gae(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
                                       double gamma_d, double lam_d) {
  TORCH_CHECK(rewards.dim() == 2 && values.sizes() == rewards.sizes() && mask.sizes() == rewards.sizes(),
              "gae: rewards, values and mask must all be [B, T]");
  TORCH_CHECK(rewards.scalar_type() == values.scalar_type(), "gae: rewards and values must share a dtype");
  TORCH_CHECK(mask.scalar_type() == at::kByte, "gae: mask must be uint8");
  TORCH_CHECK(rewards.device().is_cpu() && values.device().is_cpu() && mask.device().is_cpu(),
              "gae (cpp): tensors must be on CPU");
  const int64_t B = rewards.size(0), T = rewards.size(1);
  auto opts = rewards.options().dtype(at::kFloat);
  at::Tensor adv = at::empty({B, T}, opts), ret = at::empty({B, T}, opts);
  const float gamma = static_cast<float>(gamma_d), c = static_cast<float>(gamma_d * lam_d);
  const uint8_t* m_p = mask.const_data_ptr<uint8_t>();
  float* adv_p = adv.data_ptr<float>();
  float* ret_p = ret.data_ptr<float>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rewards.scalar_type(), "gae", [&] {
    const scalar_t* r_p = rewards.const_data_ptr<scalar_t>();
    const scalar_t* v_p = values.const_data_ptr<scalar_t>();
    // A row is a serial chain of T fused multiply-adds (~1 ns each): group rows so a task is >= ~16k steps.
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(T, 1));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        gae_row(r_p + b * rewards.stride(0), rewards.stride(1), v_p + b * values.stride(0), values.stride(1),
                m_p + b * mask.stride(0), mask.stride(1), T, gamma, c, adv_p + b * T, ret_p + b * T);
      }
    });
  });
  return {adv, ret};
}

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_FRAGMENT(rlhf_kernels, m) {
  m.def("gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) { m.impl("gae", &rlhf::gae); }
