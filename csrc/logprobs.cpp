// kernels.logprobs on CPU: forward (logp, entropy, lse) and backward (grad_logits), fp32 math.
// Same math as the Triton kernels in kernels/logprobs.py; rows are split across threads with
// at::parallel_for and each row is streamed once per pass in kChunk-sized fp32 chunks.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "cpu_math.h"

namespace rlhf {
namespace {

struct RowStats {
  float lse;      // logsumexp(x), x = logits / T
  float entropy;  // -sum p log p
};

// Online softmax over one row: running max m (from -inf), s = sum e^(x-m), t = sum e^(x-m)(x-m).
// The entropy is log s - t / s; keeping t relative to m avoids the cancellation of lse - E[x] at
// large |x| (1e4 logits lose ~1e-3 absolute in fp32 otherwise).
template <typename T>
RowStats row_stats(const T* row, int64_t sv, int64_t V, float inv_temp, bool want_entropy, float* buf) {
  float m = kNegInf, s = 0.f, t = 0.f;
  for (int64_t start = 0; start < V; start += kChunk) {
    const int64_t len = std::min(kChunk, V - start);
    load_scaled(row + start * sv, sv, len, inv_temp, buf);
    float cmax = kNegInf;
#pragma omp simd reduction(max : cmax)
    for (int64_t i = 0; i < len; ++i) cmax = buf[i] > cmax ? buf[i] : cmax;
    const float m_new = std::max(m, cmax);
    if (m_new == kNegInf) continue;  // every entry so far is -inf: nothing to add
    const float alpha = exp_nonpos(m - m_new);
    if (want_entropy) t = alpha * (t + (s > 0.f ? (m - m_new) * s : 0.f));
    s *= alpha;
    float cs = 0.f, ct = 0.f;
    if (want_entropy) {
#pragma omp simd reduction(+ : cs, ct)
      for (int64_t i = 0; i < len; ++i) {
        const float d = buf[i] - m_new;
        const float e = exp_nonpos(d);
        cs += e;
        ct += e * (d < -100.f ? -100.f : d);  // e == 0 below d = -87.3: keeps 0 * -inf out
      }
    } else {
#pragma omp simd reduction(+ : cs)
      for (int64_t i = 0; i < len; ++i) cs += exp_nonpos(buf[i] - m_new);
    }
    s += cs;
    t += ct;
    m = m_new;
  }
  const float log_s = std::log(s);
  return {m + log_s, want_entropy ? log_s - t / s : 0.f};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_fwd(const at::Tensor& rows3, const at::Tensor& labels,
                                                            double inv_temp_d, int64_t ignore_index, bool entropy) {
  check_rows3(rows3, "logprobs_fwd");
  TORCH_CHECK(rows3.device().is_cpu(), "logprobs_fwd (cpp): logits must be on CPU");
  const int64_t N = rows3.size(0) * rows3.size(1), V = rows3.size(2), sv = rows3.stride(2);
  TORCH_CHECK(labels.numel() == N, "logprobs_fwd: labels must have one entry per row");
  const auto lab = labels.to(at::kLong).contiguous();
  const int64_t* lab_p = lab.const_data_ptr<int64_t>();
  auto opts = rows3.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({N}, opts), lse = at::empty({N}, opts);
  at::Tensor ent = entropy ? at::empty({N}, opts) : at::empty({0}, opts);
  float* logp_p = logp.data_ptr<float>();
  float* lse_p = lse.data_ptr<float>();
  float* ent_p = entropy ? ent.data_ptr<float>() : nullptr;
  const float inv_temp = static_cast<float>(inv_temp_d);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows3.scalar_type(), "logprobs_fwd", [&] {
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      alignas(64) float buf[kChunk];
      for (int64_t n = begin; n < end; ++n) {
        const int64_t label = lab_p[n];
        if (label == ignore_index) {
          logp_p[n] = 0.f;
          lse_p[n] = 0.f;
          if (ent_p) ent_p[n] = 0.f;
          continue;
        }
        const scalar_t* row = row_ptr<scalar_t>(rows3, n);
        const RowStats st = row_stats(row, sv, V, inv_temp, entropy, buf);
        const float x_label = (label >= 0 && label < V) ? to_f32(row[label * sv]) * inv_temp : kNegInf;
        logp_p[n] = x_label - st.lse;
        lse_p[n] = st.lse;
        if (ent_p) ent_p[n] = st.entropy;
      }
    });
  });
  return {logp, ent, lse};
}

// One row of the backward: gl = g_logp / T, ge = g_entropy / T, h = entropy, l = lse.
template <typename T>
void row_grad(const T* row, int64_t sv, int64_t V, int64_t label, float inv_temp, float l, float gl, float ge,
              float h, float* buf, T* out) {
  for (int64_t start = 0; start < V; start += kChunk) {
    const int64_t len = std::min(kChunk, V - start);
    load_scaled(row + start * sv, sv, len, inv_temp, buf);
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const float logp = buf[i] - l;
      const float p = exp_nonpos(logp);
      // p == 0 exactly below logp = -87.3, so clamping logp keeps 0 * -inf out without a branch
      const float ent_term = p * ((logp < -100.f ? -100.f : logp) + h);
      buf[i] = -gl * p - ge * ent_term;
    }
    if (label >= start && label < start + len) buf[label - start] += gl;
    T* dst = out + start;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<T>(buf[i]);
  }
}

// grad_x_v = g_logp (1[v == label] - p_v) - g_ent p_v (log p_v + H), then / T into the logits' dtype.
at::Tensor logprobs_bwd(const at::Tensor& rows3, const at::Tensor& labels, const at::Tensor& lse,
                        const at::Tensor& ent, const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_ent,
                        double inv_temp_d, int64_t ignore_index) {
  check_rows3(rows3, "logprobs_bwd");
  const int64_t N = rows3.size(0) * rows3.size(1), V = rows3.size(2), sv = rows3.stride(2);
  const auto lab = labels.to(at::kLong).contiguous();
  const int64_t* lab_p = lab.const_data_ptr<int64_t>();
  const auto lse_c = lse.contiguous(), g_lp = grad_logp.to(at::kFloat).contiguous();
  const bool with_ent = grad_ent.has_value() && grad_ent->defined();
  at::Tensor g_en, ent_c;
  if (with_ent) {
    g_en = grad_ent->to(at::kFloat).contiguous();
    ent_c = ent.contiguous();
  }
  at::Tensor grad = at::empty({N, V}, rows3.options());
  const float inv_temp = static_cast<float>(inv_temp_d);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows3.scalar_type(), "logprobs_bwd", [&] {
    scalar_t* grad_p = grad.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      alignas(64) float buf[kChunk];
      for (int64_t n = begin; n < end; ++n) {
        scalar_t* out = grad_p + n * V;
        const int64_t label = lab_p[n];
        if (label == ignore_index) {
          std::fill(out, out + V, scalar_t(0));
          continue;
        }
        row_grad(row_ptr<scalar_t>(rows3, n), sv, V, label, inv_temp, lse_c.const_data_ptr<float>()[n],
                 g_lp.const_data_ptr<float>()[n] * inv_temp, with_ent ? g_en.const_data_ptr<float>()[n] * inv_temp : 0.f,
                 with_ent ? ent_c.const_data_ptr<float>()[n] : 0.f, buf, out);
      }
    });
  });
  return grad;
}

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_FRAGMENT(rlhf_kernels, m) {
  m.def(
      "logprobs_fwd(Tensor rows3, Tensor labels, float inv_temp, int ignore_index, bool entropy) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "logprobs_bwd(Tensor rows3, Tensor labels, Tensor lse, Tensor ent, Tensor grad_logp, Tensor? grad_ent, "
      "float inv_temp, int ignore_index) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("logprobs_fwd", &rlhf::logprobs_fwd);
  m.impl("logprobs_bwd", &rlhf::logprobs_bwd);
}
