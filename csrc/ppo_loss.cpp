// kernels.ppo_loss on CPU: the fused clipped PPO loss + stats forward and its backward (gradient to
// logprobs), the math of kernels/ppo_loss.py. The forward splits the N tokens into fixed kChunk
// chunks, sums each in double and adds the chunk sums in order, so the result does not depend on
// the thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_math.h"

namespace rlhf {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

struct PpoToken {
  float A, ratio, log_ratio, pg1, pg2, clip1, loss;
};

inline PpoToken ppo_token(float lp, float olp, float A, float lo, float hi, float dual_clip) {
  PpoToken k;
  k.A = A;
  k.log_ratio = lp - olp;
  k.ratio = std::exp(k.log_ratio);
  k.pg1 = -A * k.ratio;
  k.pg2 = -A * std::min(std::max(k.ratio, lo), hi);
  k.clip1 = std::max(k.pg1, k.pg2);
  k.loss = (dual_clip > 0.f && A < 0.f) ? std::min(k.clip1, -A * dual_clip) : k.clip1;
  return k;
}

// d loss_t / d logprobs_t; max/min split the gradient evenly on ties (as torch.maximum/minimum do).
inline float ppo_token_grad(const PpoToken& k, float lo, float hi, float dual_clip) {
  const float g1 = -k.A * k.ratio;
  const float g2 = (k.ratio >= lo && k.ratio <= hi) ? g1 : 0.f;
  float g = k.pg1 > k.pg2 ? g1 : (k.pg2 > k.pg1 ? g2 : 0.5f * (g1 + g2));
  if (dual_clip > 0.f && k.A < 0.f) {
    const float pg3 = -k.A * dual_clip;
    g = k.clip1 < pg3 ? g : (pg3 < k.clip1 ? 0.f : 0.5f * g);
  }
  return g;
}

struct Partial {
  double loss = 0, count = 0, clipped = 0, kl = 0, ratio = 0;
  float rmin = kInf, rmax = -kInf;
};

template <typename T>
Partial ppo_chunk(const T* lp, const T* olp, const T* adv, const uint8_t* m, int64_t begin, int64_t end, float lo,
                  float hi, float dual_clip) {
  Partial p;
  for (int64_t i = begin; i < end; ++i) {
    if (m[i] == 0) continue;
    const PpoToken k = ppo_token(to_f32(lp[i]), to_f32(olp[i]), to_f32(adv[i]), lo, hi, dual_clip);
    p.loss += k.loss;
    p.count += 1;
    p.clipped += k.pg2 > k.pg1 ? 1 : 0;
    p.kl += (k.ratio - 1.f) - k.log_ratio;
    p.ratio += k.ratio;
    p.rmin = std::min(p.rmin, k.ratio);
    p.rmax = std::max(p.rmax, k.ratio);
  }
  return p;
}

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
      for (int64_t i = begin; i < end; ++i) {
        float g = 0.f;
        if (m_p[i] != 0) {
          const PpoToken k = ppo_token(to_f32(lp_p[i]), to_f32(olp_p[i]), to_f32(adv_p[i]), lo, hi, dual);
          g = ppo_token_grad(k, lo, hi, dual) * scale;
        }
        g_p[i] = static_cast<scalar_t>(g);
      }
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
