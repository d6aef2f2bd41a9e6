// kernels.ppo_loss on CPU: the fused clipped PPO loss + stats forward and its backward (gradient to
// logprobs), the math of kernels/ppo_loss.py. The forward splits the N tokens into fixed kChunk
// chunks, sums each in fp32 (a vectorised loop) and adds the chunk sums in double, in order, so the
// result does not depend on the thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_math.h"
#include "rl_math.h"

namespace rlhf {
namespace {

constexpr float kInf = kInfF;

#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")

// Token math as arithmetic and bit masks, not selects, under no-trapping-math
// (the pragma above; these kernels never read FP exception flags): GCC 12 will not if-convert
// conditional floating-point code otherwise. Measured at N = 2^20, one thread, this 2-core EPYC:
// the backward loop went from ~17 ms (scalar, selects) to ~2 ms (vectorised).

struct PpoToken {
  float A, ratio, log_ratio, pg1, pg2, clip1, loss, valid;
};

// A masked token computes on zeros (ratio 1, loss 0), so NaN/inf padding never enters the math.
__attribute__((always_inline)) inline PpoToken ppo_token(bool valid, float lp, float olp, float A, float lo, float hi,
                                                         float dual_on, float dual_clip) {
  PpoToken k;
  k.valid = static_cast<float>(valid);
  k.A = keep_if(A, valid);
  k.log_ratio = keep_if(lp - olp, valid);
  k.ratio = exp_any(k.log_ratio);
  k.pg1 = -k.A * k.ratio;
  k.pg2 = -k.A * minf(maxf(k.ratio, lo), hi);
  k.clip1 = maxf(k.pg1, k.pg2);
  const float capped = minf(k.clip1, -k.A * dual_clip);
  const bool on = (dual_on > 0.f) & (k.A < 0.f);
  k.loss = keep_if(capped, on) + keep_if(k.clip1, !on);  // bit masks: an inf on the unused side stays out
  return k;
}

// d loss_t / d logprobs_t; max/min split the gradient evenly on ties (as torch.maximum/minimum do).
__attribute__((always_inline)) inline float ppo_token_grad(const PpoToken& k, float lo, float hi, float dual_on,
                                                           float dual_clip) {
  // bit masks rather than 0/1 weights: the ratio overflows to inf past log-ratio 88.7, and inf * 0 is NaN
  const float g1 = -k.A * k.ratio;
  const float g2 = keep_if(g1, (k.ratio >= lo) & (k.ratio <= hi));
  const bool gt1 = k.pg1 > k.pg2, gt2 = k.pg2 > k.pg1;
  const float g = keep_if(g1, gt1) + keep_if(g2, gt2) + keep_if(0.5f * (g1 + g2), !(gt1 | gt2));
  const float pg3 = -k.A * dual_clip;
  const bool lt = k.clip1 < pg3, gt = pg3 < k.clip1;
  const float g_dual = keep_if(g, lt) + keep_if(0.5f * g, !(lt | gt));
  const bool on = (dual_on > 0.f) & (k.A < 0.f);
  return keep_if(g_dual, on) + keep_if(g, !on);
}

struct Partial {
  double loss = 0, count = 0, clipped = 0, kl = 0, ratio = 0;
  float rmin = kInf, rmax = -kInf;
};

// One chunk (<= kChunk tokens): fp32 sums over the chunk, handed on in double. One loop does the token
// math with two reductions and parks the other per-token terms in stack buffers; single-reduction
// loops finish. GCC 12 left the one-loop form (all seven reductions) scalar: at N = 2^20, one thread,
// this 2-core EPYC, 23 ms -> 2.8 ms for the chunk sums (standalone, perf-checked).
template <typename T>
__attribute__((noinline)) Partial ppo_chunk(const T* lp, const T* olp, const T* adv, const uint8_t* m, int64_t begin,
                                            int64_t end, float lo, float hi, float dual_clip) {
  const float dual_on = dual_clip > 0.f ? 1.f : 0.f;
  alignas(64) float r_lo[kChunk], r_hi[kChunk], kl_t[kChunk], clip_t[kChunk];
  float loss = 0.f, rsum = 0.f;
  const int64_t n = end - begin;
  lp += begin, olp += begin, adv += begin, m += begin;
#pragma omp simd reduction(+ : loss, rsum)
  for (int64_t i = 0; i < n; ++i) {
    const bool masked = m[i] == 0;
    const PpoToken k = ppo_token(!masked, to_f32(lp[i]), to_f32(olp[i]), to_f32(adv[i]), lo, hi, dual_on, dual_clip);
    loss += k.loss;  // 0 at masked tokens (A = 0)
    // masked tokens (ratio 1) must not count: 0 in the sum, +-inf in the min/max, by bit masks
    const float r = keep_if(k.ratio, !masked);
    rsum += r;
    r_lo[i] = r + keep_if(kInf, masked);
    r_hi[i] = r - keep_if(kInf, masked);
    kl_t[i] = (k.ratio - 1.f) - k.log_ratio;  // 0 at masked tokens (ratio 1, log_ratio 0)
    clip_t[i] = keep_if(1.f, (k.pg2 > k.pg1) & !masked);
  }
  float count = 0.f, clipped = 0.f, kl = 0.f, rmin = kInf, rmax = -kInf;
#pragma omp simd reduction(+ : count)
  for (int64_t i = 0; i < n; ++i) count += static_cast<float>(m[i] != 0);
#pragma omp simd reduction(+ : clipped)
  for (int64_t i = 0; i < n; ++i) clipped += clip_t[i];
#pragma omp simd reduction(+ : kl)
  for (int64_t i = 0; i < n; ++i) kl += kl_t[i];
#pragma omp simd reduction(min : rmin) reduction(max : rmax)
  for (int64_t i = 0; i < n; ++i) {
    rmin = minf(rmin, r_lo[i]);
    rmax = maxf(rmax, r_hi[i]);
  }
  Partial p;
  p.loss = loss;
  p.count = count;
  p.clipped = clipped;
  p.kl = kl;
  p.ratio = rsum;
  p.rmin = rmin;
  p.rmax = rmax;
  return p;
}

template <typename T>
__attribute__((noinline)) void ppo_grad_range(const T* lp, const T* olp, const T* adv, const uint8_t* m, int64_t begin, int64_t end, float lo,
                    float hi, float dual_clip, float scale, T* grad) {
  const float dual_on = dual_clip > 0.f ? 1.f : 0.f;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const PpoToken k = ppo_token(m[i] != 0, to_f32(lp[i]), to_f32(olp[i]), to_f32(adv[i]), lo, hi, dual_on, dual_clip);
    grad[i] = static_cast<T>(ppo_token_grad(k, lo, hi, dual_on, dual_clip) * scale);  // 0 at masked tokens (A = 0)
  }
}

#pragma GCC pop_options

void check_inputs(const at::Tensor& lp, const at::Tensor& olp, const at::Tensor& adv, const at::Tensor& m,
                  const char* op) {
  TORCH_CHECK(lp.is_contiguous() && olp.is_contiguous() && adv.is_contiguous() && m.is_contiguous(), op,
              ": inputs must be contiguous");
  TORCH_CHECK(olp.numel() == lp.numel() && adv.numel() == lp.numel() && m.numel() == lp.numel(), op,
              ": inputs must have the same number of elements");
  TORCH_CHECK(olp.scalar_type() == lp.scalar_type() && adv.scalar_type() == lp.scalar_type(), op,
              ": logprobs, old_logprobs and advantages must share a dtype");
  TORCH_CHECK(m.scalar_type() == at::kByte, op, ": mask must be uint8");
  TORCH_CHECK(lp.device().is_cpu(), op, " (cpp): tensors must be on CPU");
}

// -> [8] fp32: (pg_loss, clipfrac, approx_kl, ratio_mean, ratio_min, ratio_max, count, 0).
at::Tensor ppo_loss_fwd(const at::Tensor& lp, const at::Tensor& olp, const at::Tensor& adv, const at::Tensor& m,
                        double lo_d, double hi_d, double dual_d) {
  check_inputs(lp, olp, adv, m, "ppo_loss_fwd");
  const int64_t N = lp.numel(), n_chunks = (N + kChunk - 1) / kChunk;
  const float lo = static_cast<float>(lo_d), hi = static_cast<float>(hi_d), dual = static_cast<float>(dual_d);
  std::vector<Partial> parts(n_chunks);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, lp.scalar_type(), "ppo_loss_fwd", [&] {
    const scalar_t* lp_p = lp.const_data_ptr<scalar_t>();
    const scalar_t* olp_p = olp.const_data_ptr<scalar_t>();
    const scalar_t* adv_p = adv.const_data_ptr<scalar_t>();
    const uint8_t* m_p = m.const_data_ptr<uint8_t>();
    at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c)
        parts[c] = ppo_chunk(lp_p, olp_p, adv_p, m_p, c * kChunk, std::min(N, (c + 1) * kChunk), lo, hi, dual);
    });
  });
  Partial t;
  for (const Partial& p : parts) {
    t.loss += p.loss;
    t.count += p.count;
    t.clipped += p.clipped;
    t.kl += p.kl;
    t.ratio += p.ratio;
    t.rmin = std::min(t.rmin, p.rmin);
    t.rmax = std::max(t.rmax, p.rmax);
  }
  const double denom = std::max(t.count, 1.0);
  at::Tensor out = at::zeros({8}, lp.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  o[0] = static_cast<float>(t.loss / denom);
  o[1] = static_cast<float>(t.clipped / denom);
  o[2] = static_cast<float>(t.kl / denom);
  o[3] = static_cast<float>(t.ratio / denom);
  o[4] = t.count > 0 ? t.rmin : 0.f;
  o[5] = t.count > 0 ? t.rmax : 0.f;
  o[6] = static_cast<float>(t.count);
  return out;
}

at::Tensor ppo_loss_bwd(const at::Tensor& lp, const at::Tensor& olp, const at::Tensor& adv, const at::Tensor& m,
                        const at::Tensor& out, const at::Tensor& grad_out, double lo_d, double hi_d, double dual_d) {
  check_inputs(lp, olp, adv, m, "ppo_loss_bwd");
  const int64_t N = lp.numel();
  const float lo = static_cast<float>(lo_d), hi = static_cast<float>(hi_d), dual = static_cast<float>(dual_d);
  const float count = out.to(at::kFloat).contiguous().const_data_ptr<float>()[6];
  const float scale = grad_out.to(at::kFloat).item<float>() / std::max(count, 1.f);
  at::Tensor grad = at::empty_like(lp);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, lp.scalar_type(), "ppo_loss_bwd", [&] {
    const scalar_t* lp_p = lp.const_data_ptr<scalar_t>();
    const scalar_t* olp_p = olp.const_data_ptr<scalar_t>();
    const scalar_t* adv_p = adv.const_data_ptr<scalar_t>();
    const uint8_t* m_p = m.const_data_ptr<uint8_t>();
    scalar_t* g_p = grad.data_ptr<scalar_t>();
    at::parallel_for(0, N, kChunk, [&](int64_t begin, int64_t end) {
      ppo_grad_range(lp_p, olp_p, adv_p, m_p, begin, end, lo, hi, dual, scale, g_p);
    });
  });
  return grad;
}

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_FRAGMENT(rlhf_kernels, m) {
  m.def(
      "ppo_loss_fwd(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, float lo, float hi, "
      "float dual_clip) -> Tensor");
  m.def(
      "ppo_loss_bwd(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, Tensor out, "
      "Tensor grad_out, float lo, float hi, float dual_clip) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("ppo_loss_fwd", &rlhf::ppo_loss_fwd);
  m.impl("ppo_loss_bwd", &rlhf::ppo_loss_bwd);
}
