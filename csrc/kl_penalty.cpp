// kernels.kl_penalty on CPU: k1/k2/k3 per-token KL estimates and their gradient w.r.t. logprobs,
// the math of kernels/kl_penalty.py (including the small-|x| Taylor series of k3 and its gradient).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "cpu_math.h"
#include "rl_math.h"

namespace rlhf {
namespace {

// (exp(-x) - 1 + x, 1 - exp(-x)); the Taylor series to x^8 below |x| = 0.5 avoids the fp32
// cancellation of exp(-x) - 1 (a 10% error in k3 at x = 1e-3 otherwise). Both forms are computed and
// one is kept by bit masks, so the loops vectorise (see rl_math.h).
__attribute__((always_inline)) inline void k3_and_grad(float x, float& k, float& dk) {
  float d = x * (-1.f / 5040 + x * (1.f / 40320));
  d = x * (-1.f / 120 + x * (1.f / 720 + d));
  d = x * (-1.f / 6 + x * (1.f / 24 + d));
  const float k_series = x * x * (0.5f + d);
  const float g = x * (1.f / 120 + x * (-1.f / 720 + x * (1.f / 5040 - x * (1.f / 40320))));
  const float dk_series = x * (1.f + x * (-0.5f + x * (1.f / 6 + x * (-1.f / 24 + g))));
  const float e = exp_any(-x);
  const bool small = std::fabs(x) < 0.5f;
  k = keep_if(k_series, small) + keep_if(e - 1.f + x, !small);
  dk = keep_if(dk_series, small) + keep_if(1.f - e, !small);
}

// KIND is a template argument so each loop body is straight-line code (it vectorises).
template <int KIND>
__attribute__((always_inline)) inline void kl_token(float raw, float clamp, float& k, float& dk) {
  const float x = minf(maxf(raw, -clamp), clamp);
  if constexpr (KIND == 1) {
    k = x;
    dk = 1.f;
  } else if constexpr (KIND == 2) {
    k = 0.5f * x * x;
    dk = x;
  } else {
    k3_and_grad(x, k, dk);
  }
  dk = keep_if(dk, (raw >= -clamp) & (raw <= clamp));
}

template <int KIND, typename T>
__attribute__((noinline)) void kl_fwd_kind(const T* lp, const T* ref, int64_t n, float clamp, float* kl) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float k, dk;
    kl_token<KIND>(to_f32(lp[i]) - to_f32(ref[i]), clamp, k, dk);
    kl[i] = k;
  }
}

template <typename T>
void kl_fwd_range(const T* lp, const T* ref, int64_t n, int64_t kind, float clamp, float* kl) {
  if (kind == 1) return kl_fwd_kind<1>(lp, ref, n, clamp, kl);
  if (kind == 2) return kl_fwd_kind<2>(lp, ref, n, clamp, kl);
  kl_fwd_kind<3>(lp, ref, n, clamp, kl);
}

template <int KIND, typename T>
__attribute__((noinline)) void kl_bwd_kind(const T* lp, const T* ref, const float* grad_kl, int64_t n, float clamp,
                                           T* grad) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float k, dk;
    kl_token<KIND>(to_f32(lp[i]) - to_f32(ref[i]), clamp, k, dk);
    grad[i] = static_cast<T>(grad_kl[i] * dk);
  }
}

template <typename T>
void kl_bwd_range(const T* lp, const T* ref, const float* grad_kl, int64_t n, int64_t kind, float clamp, T* grad) {
  if (kind == 1) return kl_bwd_kind<1>(lp, ref, grad_kl, n, clamp, grad);
  if (kind == 2) return kl_bwd_kind<2>(lp, ref, grad_kl, n, clamp, grad);
  kl_bwd_kind<3>(lp, ref, grad_kl, n, clamp, grad);
}

void check_inputs(const at::Tensor& lp, const at::Tensor& ref, int64_t kind, const char* op) {
  TORCH_CHECK(lp.is_contiguous() && ref.is_contiguous(), op, ": inputs must be contiguous");
  TORCH_CHECK(lp.numel() == ref.numel() && lp.scalar_type() == ref.scalar_type(), op,
              ": logprobs and ref_logprobs must match in size and dtype");
  TORCH_CHECK(kind >= 1 && kind <= 3, op, ": kind must be 1, 2 or 3");
  TORCH_CHECK(lp.device().is_cpu(), op, " (cpp): tensors must be on CPU");
}

at::Tensor kl_penalty_fwd(const at::Tensor& lp, const at::Tensor& ref, int64_t kind, double clamp_d) {
  check_inputs(lp, ref, kind, "kl_penalty_fwd");
  const int64_t N = lp.numel();
  const float clamp = static_cast<float>(clamp_d);
  at::Tensor kl = at::empty({N}, lp.options().dtype(at::kFloat));
  float* kl_p = kl.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, lp.scalar_type(), "kl_penalty_fwd", [&] {
    const scalar_t* lp_p = lp.const_data_ptr<scalar_t>();
    const scalar_t* ref_p = ref.const_data_ptr<scalar_t>();
    at::parallel_for(0, N, kChunk, [&](int64_t begin, int64_t end) {
      kl_fwd_range(lp_p + begin, ref_p + begin, end - begin, kind, clamp, kl_p + begin);
    });
  });
  return kl;
}

at::Tensor kl_penalty_bwd(const at::Tensor& lp, const at::Tensor& ref, const at::Tensor& grad_kl, int64_t kind,
                          double clamp_d) {
  check_inputs(lp, ref, kind, "kl_penalty_bwd");
  TORCH_CHECK(grad_kl.is_contiguous() && grad_kl.scalar_type() == at::kFloat && grad_kl.numel() == lp.numel(),
              "kl_penalty_bwd: grad_kl must be contiguous fp32 [N]");
  const int64_t N = lp.numel();
  const float clamp = static_cast<float>(clamp_d);
  const float* gk_p = grad_kl.const_data_ptr<float>();
  at::Tensor grad = at::empty_like(lp);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, lp.scalar_type(), "kl_penalty_bwd", [&] {
    const scalar_t* lp_p = lp.const_data_ptr<scalar_t>();
    const scalar_t* ref_p = ref.const_data_ptr<scalar_t>();
    scalar_t* g_p = grad.data_ptr<scalar_t>();
    at::parallel_for(0, N, kChunk, [&](int64_t begin, int64_t end) {
      kl_bwd_range(lp_p + begin, ref_p + begin, gk_p + begin, end - begin, kind, clamp, g_p + begin);
    });
  });
  return grad;
}

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_FRAGMENT(rlhf_kernels, m) {
  m.def("kl_penalty_fwd(Tensor logprobs, Tensor ref_logprobs, int kind, float clamp) -> Tensor");
  m.def("kl_penalty_bwd(Tensor logprobs, Tensor ref_logprobs, Tensor grad_kl, int kind, float clamp) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("kl_penalty_fwd", &rlhf::kl_penalty_fwd);
  m.impl("kl_penalty_bwd", &rlhf::kl_penalty_bwd);
}
