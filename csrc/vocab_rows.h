// Row kernels shared by token_stats.cpp and full_kl.cpp (and, through token_stats_*, the fused-linear
// ops): per row of logits x and optional ref_logits z, both / T,
//   forward:  lse, logp = x[label] - lse, entropy H, KL(p || q), lse_ref
//   backward: d/dx_v = g_logp 1[v == label] - p_v (g_logp + g_ent (log p_v + H) - g_kl (log p_v - log q_v - KL))
// Same math as the Triton kernels of kernels/_vocab.py (see its docstring); fp32 inside, rows split
// across threads with at::parallel_for, each row streamed once per pass in kChunk-sized fp32 chunks.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>

#include "cpu_math.h"

namespace rlhf::vocab {

struct RowOut {
  float lse, entropy, kl, lse_ref;
};

// Load `len` elements (stride `sv`) scaled by `scale` into fp32 `dst`; return their max (one pass
// instead of a load pass and a max pass).
template <typename T>
inline float load_scaled_max(const T* src, int64_t sv, int64_t len, float scale, float* dst) {
  float mx = kNegInf;
  if (sv == 1) {
#pragma omp simd reduction(max : mx)
    for (int64_t i = 0; i < len; ++i) {
      const float v = to_f32(src[i]) * scale;
      dst[i] = v;
      mx = std::max(mx, v);
    }
  } else {
    for (int64_t i = 0; i < len; ++i) {
      const float v = to_f32(src[i * sv]) * scale;
      dst[i] = v;
      mx = std::max(mx, v);
    }
  }
  return mx;
}

// Online softmax over x (running max m, s = sum e^(x-m), t = sum e^(x-m)(x-m)) and z (mr, sr), and
// u = sum e^(x-m) ((x-m) - (z-mr)): KL = u/s - log s + log sr. Every sum stays relative to the
// running maxima, so nothing cancels at |logits| ~ 1e4; KL(x, x) is exactly 0. Where x has mass and
// z is -inf (q_v = 0 < p_v), u and so KL become +inf, as they should.
// Fusing load+max and the x and z exp loops: full_kl forward, 256 x 32000 fp32, 1 thread of the dev
// machine's x86-64 CPU (AVX2): 2.46 -> 1.55 ns per (x, z) element pair (2026-11-24).
template <typename T, bool ENT, bool KL>
RowOut row_fwd(const T* x, int64_t sx, const T* z, int64_t sz, int64_t V, float inv_temp, float* bx, float* bz) {
  float m = kNegInf, s = 0.f, t = 0.f, mr = kNegInf, sr = 0.f, u = 0.f;
  for (int64_t start = 0; start < V; start += kChunk) {
    const int64_t len = std::min(kChunk, V - start);
    const float m_new = std::max(m, load_scaled_max(x + start * sx, sx, len, inv_temp, bx));
    float mr_new = mr;
    if constexpr (KL) mr_new = std::max(mr, load_scaled_max(z + start * sz, sz, len, inv_temp, bz));
    // While every z so far is -inf, subtract 0 instead of -inf (no -inf - -inf = NaN); sr stays 0.
    const float mr_sub = mr_new == kNegInf ? 0.f : mr_new;
    const float shift_r = mr_new == kNegInf ? 0.f : mr - mr_new;
    const float alpha_r = mr_new == kNegInf ? 1.f : exp_nonpos(shift_r);
    if (m_new == kNegInf) {  // every x so far is -inf: only the reference sum moves
      if constexpr (KL) {
        float cs = 0.f;
#pragma omp simd reduction(+ : cs)
        for (int64_t i = 0; i < len; ++i) cs += exp_nonpos(bz[i] - mr_sub);
        sr = sr * alpha_r + cs;
        mr = mr_new;
      }
      continue;
    }
    const float alpha = exp_nonpos(m - m_new);
    if constexpr (ENT) t = alpha * (t + (s > 0.f ? (m - m_new) * s : 0.f));
    if constexpr (KL) u = alpha * (u + (s > 0.f ? ((m - m_new) - shift_r) * s : 0.f));
    // One loop for both rows: two exps per element and the three sums, all from L1.
    float cs = 0.f, ct = 0.f, cu = 0.f, csr = 0.f;
#pragma omp simd reduction(+ : cs, ct, cu, csr)
    for (int64_t i = 0; i < len; ++i) {
      const float d = bx[i] - m_new;
      const float e = exp_nonpos(d);
      cs += e;
      if constexpr (ENT) ct += e > 0.f ? e * d : 0.f;
      if constexpr (KL) {
        const float dz = bz[i] - mr_sub;
        csr += exp_nonpos(dz);
        cu += e > 0.f ? e * (d - dz) : 0.f;
      }
    }
    s = s * alpha + cs;
    t += ct;
    u += cu;
    sr = sr * alpha_r + csr;
    m = m_new;
    mr = mr_new;
  }
  const float log_s = std::log(s);
  RowOut out{m + log_s, 0.f, 0.f, 0.f};
  if constexpr (ENT) out.entropy = log_s - t / s;
  if constexpr (KL) {
    const float log_sr = std::log(sr);
    out.kl = std::max(u / s - log_s + log_sr, 0.f);  // clamp a rounding residue: KL >= 0
    out.lse_ref = mr + log_sr;
  }
  return out;
}

// c_v = c0 + c1 log p_v + g_kl log q_v; grad_v = g_logp 1[v == label] - p_v c_v (0 where p_v == 0).
// fp32 rows, contiguous, are read and written straight from the compute loop (no scratch passes):
// full_kl backward 256 x 32000, 1 thread: 1.46 -> 1.01 ns per element pair. 16-bit rows keep the
// separate convert passes: converting inside the exp loop measured 1.96 -> 5.71 ns (bf16), the
// conversion stops that loop vectorising.
template <typename T, bool KL>
void row_bwd(const T* x, int64_t sx, const T* z, int64_t sz, int64_t V, int64_t label, float inv_temp, float lse,
             float lse_ref, float g_logp, float c0, float c1, float g_kl, float* bx, float* bz, T* out) {
  constexpr bool kF32 = std::is_same_v<T, float>;
  const bool contiguous = kF32 && sx == 1 && (!KL || sz == 1);
  for (int64_t start = 0; start < V; start += kChunk) {
    const int64_t len = std::min(kChunk, V - start);
    float* g = kF32 ? reinterpret_cast<float*>(out + start) : bx;
    if (contiguous) {
      const T* xc = x + start;
      const T* zc = KL ? z + start : nullptr;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const float logp = to_f32(xc[i]) * inv_temp - lse;
        const float p = exp_nonpos(logp);
        float c = c0 + c1 * logp;
        if constexpr (KL) c += g_kl * (to_f32(zc[i]) * inv_temp - lse_ref);
        g[i] = p > 0.f ? -p * c : 0.f;
      }
    } else {
      load_scaled(x + start * sx, sx, len, inv_temp, bx);
      if constexpr (KL) load_scaled(z + start * sz, sz, len, inv_temp, bz);
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const float logp = bx[i] - lse;
        const float p = exp_nonpos(logp);
        float c = c0 + c1 * logp;
        if constexpr (KL) c += g_kl * (bz[i] - lse_ref);
        g[i] = p > 0.f ? -p * c : 0.f;
      }
    }
    if (label >= start && label < start + len) g[label - start] += g_logp;
    if constexpr (!kF32) {
      T* dst = out + start;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<T>(bx[i]);
    }
  }
}

inline at::Tensor f32_or_empty(const std::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->to(at::kFloat).contiguous() : at::Tensor();
}

// -> (logp, entropy, kl, lse, lse_ref), each [N] fp32, or empty when not asked for (no labels: no
// logp; no z: no kl / lse_ref). Rows whose label == ignore_index read nothing and yield zeros.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> stats_fwd(
    const at::Tensor& x3, const std::optional<at::Tensor>& z3_opt, const std::optional<at::Tensor>& labels_opt,
    double inv_temp_d, int64_t ignore_index, bool entropy, const char* op) {
  check_rows3(x3, op);
  TORCH_CHECK(x3.device().is_cpu(), op, " (cpp): logits must be on CPU");
  const int64_t N = x3.size(0) * x3.size(1), V = x3.size(2);
  const bool has_z = z3_opt.has_value() && z3_opt->defined();
  const bool has_labels = labels_opt.has_value() && labels_opt->defined();
  if (has_z) {
    check_rows3(*z3_opt, op);
    TORCH_CHECK(z3_opt->scalar_type() == x3.scalar_type(), op, ": ref_logits must have the logits' dtype");
    TORCH_CHECK(z3_opt->size(0) * z3_opt->size(1) == N && z3_opt->size(2) == V, op, ": ref_logits shape mismatch");
  }
  at::Tensor lab;
  if (has_labels) {
    lab = labels_opt->to(at::kLong).contiguous();
    TORCH_CHECK(lab.numel() == N, op, ": labels must have one entry per row");
  }
  auto opts = x3.options().dtype(at::kFloat);
  auto maybe = [&](bool on) { return on ? at::empty({N}, opts) : at::empty({0}, opts); };
  at::Tensor logp = maybe(has_labels), ent = maybe(entropy), kl = maybe(has_z), lse = maybe(true),
             lse_ref = maybe(has_z);
  const int64_t* lab_p = has_labels ? lab.const_data_ptr<int64_t>() : nullptr;
  float* logp_p = has_labels ? logp.data_ptr<float>() : nullptr;
  float* ent_p = entropy ? ent.data_ptr<float>() : nullptr;
  float* kl_p = has_z ? kl.data_ptr<float>() : nullptr;
  float* lse_p = lse.data_ptr<float>();
  float* lse_ref_p = has_z ? lse_ref.data_ptr<float>() : nullptr;
  const float inv_temp = static_cast<float>(inv_temp_d);
  const int64_t sx = x3.stride(2), sz = has_z ? z3_opt->stride(2) : 0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x3.scalar_type(), "vocab_stats_fwd", [&] {
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      alignas(64) float bx[kChunk];
      alignas(64) float bz[kChunk];
      for (int64_t n = begin; n < end; ++n) {
        const int64_t label = has_labels ? lab_p[n] : -1;
        if (has_labels && label == ignore_index) {
          logp_p[n] = 0.f;
          lse_p[n] = 0.f;
          if (ent_p) ent_p[n] = 0.f;
          if (kl_p) kl_p[n] = lse_ref_p[n] = 0.f;
          continue;
        }
        const scalar_t* x = row_ptr<scalar_t>(x3, n);
        const scalar_t* z = has_z ? row_ptr<scalar_t>(*z3_opt, n) : nullptr;
        RowOut r;
        if (has_z)
          r = entropy ? row_fwd<scalar_t, true, true>(x, sx, z, sz, V, inv_temp, bx, bz)
                      : row_fwd<scalar_t, false, true>(x, sx, z, sz, V, inv_temp, bx, bz);
        else
          r = entropy ? row_fwd<scalar_t, true, false>(x, sx, z, sz, V, inv_temp, bx, bz)
                      : row_fwd<scalar_t, false, false>(x, sx, z, sz, V, inv_temp, bx, bz);
        lse_p[n] = r.lse;
        if (has_labels) {
          const float x_label = (label >= 0 && label < V) ? to_f32(x[label * sx]) * inv_temp : kNegInf;
          logp_p[n] = x_label - r.lse;
        }
        if (ent_p) ent_p[n] = r.entropy;
        if (kl_p) {
          kl_p[n] = r.kl;
          lse_ref_p[n] = r.lse_ref;
        }
      }
    });
  });
  return {logp, ent, kl, lse, lse_ref};
}

// Gradient w.r.t. the logits of sum(g_logp logp + g_ent entropy + g_kl kl); an absent upstream
// gradient contributes nothing. -> [N, V] contiguous in the logits' dtype.
inline at::Tensor stats_bwd(const at::Tensor& x3, const std::optional<at::Tensor>& z3_opt,
                            const std::optional<at::Tensor>& labels_opt, const at::Tensor& lse,
                            const std::optional<at::Tensor>& lse_ref_opt, const std::optional<at::Tensor>& ent_opt,
                            const std::optional<at::Tensor>& kl_opt, const std::optional<at::Tensor>& g_logp_opt,
                            const std::optional<at::Tensor>& g_ent_opt, const std::optional<at::Tensor>& g_kl_opt,
                            double inv_temp_d, int64_t ignore_index, const char* op) {
  check_rows3(x3, op);
  const int64_t N = x3.size(0) * x3.size(1), V = x3.size(2);
  const bool has_labels = labels_opt.has_value() && labels_opt->defined();
  const at::Tensor g_lp = f32_or_empty(g_logp_opt), g_en = f32_or_empty(g_ent_opt), g_k = f32_or_empty(g_kl_opt);
  const bool with_logp = has_labels && g_lp.defined(), with_ent = g_en.defined();
  const bool with_kl = g_k.defined() && z3_opt.has_value() && z3_opt->defined();
  TORCH_CHECK(!with_ent || (ent_opt.has_value() && ent_opt->defined()), op, ": entropy gradient needs the entropy");
  TORCH_CHECK(!with_kl || (kl_opt.has_value() && lse_ref_opt.has_value()), op, ": kl gradient needs kl and lse_ref");
  if (with_kl) TORCH_CHECK(z3_opt->scalar_type() == x3.scalar_type(), op, ": ref_logits must have the logits' dtype");
  at::Tensor lab = has_labels ? labels_opt->to(at::kLong).contiguous() : at::Tensor();
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor ent_c = with_ent ? ent_opt->contiguous() : at::Tensor();
  const at::Tensor kl_c = with_kl ? kl_opt->contiguous() : at::Tensor();
  const at::Tensor lse_ref_c = with_kl ? lse_ref_opt->contiguous() : at::Tensor();
  at::Tensor grad = at::empty({N, V}, x3.options());
  const float inv_temp = static_cast<float>(inv_temp_d);
  const int64_t sx = x3.stride(2), sz = with_kl ? z3_opt->stride(2) : 0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x3.scalar_type(), "vocab_stats_bwd", [&] {
    scalar_t* grad_p = grad.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      alignas(64) float bx[kChunk];
      alignas(64) float bz[kChunk];
      for (int64_t n = begin; n < end; ++n) {
        scalar_t* out = grad_p + n * V;
        const int64_t label = has_labels ? lab.const_data_ptr<int64_t>()[n] : -1;
        if (has_labels && label == ignore_index) {
          std::fill(out, out + V, scalar_t(0));
          continue;
        }
        const float g_logp = with_logp ? g_lp.const_data_ptr<float>()[n] * inv_temp : 0.f;
        float c0 = g_logp, c1 = 0.f, g_kl = 0.f, lse_ref = 0.f;
        if (with_ent) {
          const float ge = g_en.const_data_ptr<float>()[n] * inv_temp;
          c0 += ge * ent_c.const_data_ptr<float>()[n];
          c1 += ge;
        }
        if (with_kl) {
          g_kl = g_k.const_data_ptr<float>()[n] * inv_temp;
          c0 += g_kl * kl_c.const_data_ptr<float>()[n];
          c1 -= g_kl;
          lse_ref = lse_ref_c.const_data_ptr<float>()[n];
        }
        const scalar_t* x = row_ptr<scalar_t>(x3, n);
        const float l = lse_c.const_data_ptr<float>()[n];
        if (with_kl)
          row_bwd<scalar_t, true>(x, sx, row_ptr<scalar_t>(*z3_opt, n), sz, V, label, inv_temp, l, lse_ref, g_logp,
                                  c0, c1, g_kl, bx, bz, out);
        else
          row_bwd<scalar_t, false>(x, sx, nullptr, 0, V, label, inv_temp, l, 0.f, g_logp, c0, c1, 0.f, bx, bz, out);
      }
    });
  });
  return grad;
}

}  // namespace rlhf::vocab
