// kernels.gae on CPU: the masked GAE recurrence of kernels/gae.py, one reverse pass per row, rows
// split across threads with at::parallel_for. Math in fp32 (the same as the Triton/CUDA kernels);
// inputs any strides and float dtype, outputs fp32 contiguous.
//
// Also here: mask_u8, the CPU mask check of every RL-math op (kernels/_masks.py check_mask).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <tuple>
#include <type_traits>

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

// ---------------------------------------------------------------------------------------------------
// mask_u8: a mask of any dtype -> (the mask as uint8 0/1, the number of entries that are not exactly 0
// or 1), in one vectorised pass. The torch form of the same check and conversion ((m != 0) & (m != 1),
// any, then m != 0 again) made five passes, four of them to bool (which torch does not vectorise on
// CPU): 0.12 ms of a 0.18 ms kernels.gae call at B=64, T=1024 with a float mask (bench/RESULTS.md).
// ---------------------------------------------------------------------------------------------------
template <typename T>
__attribute__((always_inline)) inline auto mask_value(T x) {
  if constexpr (std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>) {
    return to_f32(x);
  } else {
    return x;
  }
}

template <typename T>
__attribute__((noinline)) int64_t mask_chunk(const T* x, int64_t n, uint8_t* out) {
  int64_t bad = 0;
#pragma omp simd reduction(+ : bad)
  for (int64_t i = 0; i < n; ++i) {
    const auto v = mask_value(x[i]);
    const bool nonzero = v != 0, one = v == 1;  // NaN: nonzero and not one, so it counts as bad
    out[i] = static_cast<uint8_t>(nonzero);
    bad += static_cast<int64_t>(nonzero & !one);
  }
  return bad;
}

std::tuple<at::Tensor, int64_t> mask_u8(const at::Tensor& mask) {
  TORCH_CHECK(mask.device().is_cpu(), "mask_u8 (cpp): the mask must be on CPU");
  const at::Tensor m = mask.contiguous();
  at::Tensor out = at::empty(m.sizes(), m.options().dtype(at::kByte));
  const int64_t N = m.numel();
  std::atomic<int64_t> bad{0};
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, m.scalar_type(), "mask_u8", [&] {
    const scalar_t* x = m.const_data_ptr<scalar_t>();
    uint8_t* o = out.data_ptr<uint8_t>();
    // ~1 ns per element: threads only past 2^18 elements, where they pay for their start-up
    at::parallel_for(0, N, 1 << 18, [&](int64_t begin, int64_t end) {
      bad += mask_chunk(x + begin, end - begin, o + begin);
    });
  });
  return {out, bad.load()};
}

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_FRAGMENT(rlhf_kernels, m) {
  m.def("gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
  m.def("mask_u8(Tensor mask) -> (Tensor, int)");
}

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("gae", &rlhf::gae);
  m.impl("mask_u8", &rlhf::mask_u8);
}
