// Row kernels shared by token_stats.cpp and full_kl.cpp (and, through token_stats_*, the fused-linear
// ops and logprobs): per row of logits x and optional ref_logits z, with temperature T,
//   forward:  stats = (m, log_s) with m = max x, log_s = log sum exp((x - m) / T); logp = (x[label] - m) / T
//             - log_s; entropy H; KL(p || q); stats_ref for z
//   backward: d/dx_v = g_logp 1[v == label] - p_v (g_logp + g_ent (log p_v + H) - g_kl (log p_v - log q_v - KL))
// with log p_v = (x_v - m) / T - log_s in both passes: never x_v / T - lse, which carries the ulp of a
// large common offset (1e4: ~1e-3) into log p and p. Same math as the Triton kernels of
// kernels/_vocab.py (see its docstring); fp32 inside, rows split across threads with at::parallel_for,
// each row streamed once per pass in kChunk-sized fp32 chunks. NaN in a row propagates to its outputs
// and gradient (the masks test e == 0 / p == 0, false for NaN).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "cpu_math.h"

namespace rlhf::vocab {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Rows per thread task: at least ATen's 32768-element grain of work, so a few short rows (a small
// vocabulary) stay on one thread instead of paying an OpenMP region each.
inline int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

struct RowOut {
  float m, log_s, entropy, kl, mr, log_sr;
};

// Load `len` elements (stride `sv`) into fp32 `dst`; return their max (one pass instead of a load
// pass and a max pass). The `+ 0.f` (it only turns -0 into +0, which changes no x - max) keeps an fp
// op between the bf16 -> fp32 conversion and the max: without it GCC 12 computes the max with
// compares and masked integer shifts instead of vmaxps (full_kl forward 512 x 32000 bf16, 1 thread of
// the dev machine: 9.5 -> 8.9 ms, 2026-11-24). NaN entries may or may not win the max (vectorised max):
// callers must not rely on it to carry NaN.
template <typename T>
inline float load_max(const T* src, int64_t sv, int64_t len, float* dst) {
  float mx = kNegInf;
  if (sv == 1) {
#pragma omp simd reduction(max : mx)
    for (int64_t i = 0; i < len; ++i) {
      const float v = to_f32(src[i]) + 0.f;
      dst[i] = v;
      mx = std::max(mx, v);
    }
  } else {
    for (int64_t i = 0; i < len; ++i) {
      const float v = to_f32(src[i * sv]);
      dst[i] = v;
      mx = std::max(mx, v);
    }
  }
  return mx;
}

// dst = (src - shift) * scale for `len` elements of stride `sv`.
template <typename T>
inline void load_shift_scale(const T* src, int64_t sv, int64_t len, float shift, float scale, float* dst) {
  if (sv == 1) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) dst[i] = (to_f32(src[i]) - shift) * scale;
  } else {
    for (int64_t i = 0; i < len; ++i) dst[i] = (to_f32(src[i * sv]) - shift) * scale;
  }
}

inline bool any_nan(const float* v, int64_t len) {
  bool nan = false;
  for (int64_t i = 0; i < len; ++i) nan |= std::isnan(v[i]);
  return nan;
}

// Online softmax over x (running raw max m, s = sum e^d, t = sum e^d d with d = (x - m) / T) and z (mr,
// sr), and u = sum e^d (d - dz), dz = (z - mr) / T: KL = u/s - log s + log sr. Every sum stays relative
// to the running maxima, so nothing cancels at |logits| ~ 1e4; KL(x, x) is exactly 0. Where x has mass
// and z is -inf (q_v = 0 < p_v), u and so KL become +inf, as they should.
// Fusing load+max and the x and z exp loops: full_kl forward, 256 x 32000 fp32, 1 thread of the dev
// machine's x86-64 CPU (AVX2): 2.46 -> 1.55 ns per (x, z) element pair (2026-11-24).
// SCALED = (T != 1): the multiply by 1/T sits in the exp loop (after the exact x - max), one more op per
// element there; T = 1 skips it (full_kl forward 2048 x 32000 bf16, 2 threads: 36.0 ms with it, the
// speed of the former x / T - lse kernel without it; see bench/RESULTS.md).
template <typename T, bool ENT, bool KL, bool SCALED>
RowOut row_fwd(const T* x, int64_t sx, const T* z, int64_t sz, int64_t V, float inv_temp, float* bx, float* bz) {
  const auto scaled = [inv_temp](float v) {
    if constexpr (SCALED) return v * inv_temp;
    return v;
  };
  float m = kNegInf, s = 0.f, t = 0.f, mr = kNegInf, sr = 0.f, u = 0.f;
  for (int64_t start = 0; start < V; start += kChunk) {
    const int64_t len = std::min(kChunk, V - start);
    const float m_new = std::max(m, load_max(x + start * sx, sx, len, bx));
    float mr_new = mr;
    if constexpr (KL) mr_new = std::max(mr, load_max(z + start * sz, sz, len, bz));
    // While every z so far is -inf, subtract 0 instead of -inf (no -inf - -inf = NaN); sr stays 0.
    const float mr_sub = mr_new == kNegInf ? 0.f : mr_new;
    const float shift_r = mr_new == kNegInf ? 0.f : scaled(mr - mr_new);
    const float alpha_r = exp_nonpos(shift_r);
    if (m_new == kNegInf) {  // every x so far is -inf (or NaN): only the reference sum moves
      if (any_nan(bx, len)) s = kNaN;  // the max skipped it; the sums must not
      if constexpr (KL) {
        float cs = 0.f;
#pragma omp simd reduction(+ : cs)
        for (int64_t i = 0; i < len; ++i) cs += exp_nonpos(scaled(bz[i] - mr_sub));
        sr = sr * alpha_r + cs;
        mr = mr_new;
      }
      continue;
    }
    const float shift = scaled(m - m_new);
    const float alpha = exp_nonpos(shift);
    if constexpr (ENT) t = alpha * (t + (s > 0.f ? shift * s : 0.f));
    if constexpr (KL) u = alpha * (u + (s > 0.f ? (shift - shift_r) * s : 0.f));
    // One loop for both rows: two exps per element and the three sums, all from L1. e == 0 (a -inf
    // entry) adds 0 to t and u (not 0 * -inf); a NaN e is kept.
    float cs = 0.f, ct = 0.f, cu = 0.f, csr = 0.f;
#pragma omp simd reduction(+ : cs, ct, cu, csr)
    for (int64_t i = 0; i < len; ++i) {
      const float d = scaled(bx[i] - m_new);
      const float e = exp_nonpos(d);
      cs += e;
      if constexpr (ENT) ct += e == 0.f ? 0.f : e * d;
      if constexpr (KL) {
        const float dz = scaled(bz[i] - mr_sub);
        csr += exp_nonpos(dz);
        cu += e == 0.f ? 0.f : e * (d - dz);
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
  RowOut out{m, log_s, 0.f, 0.f, 0.f, 0.f};
  if constexpr (ENT) out.entropy = log_s - t / s;
  if constexpr (KL) {
    const float log_sr = std::log(sr);
    const float kl = u / s - log_s + log_sr;
    out.kl = kl < 0.f ? 0.f : kl;  // clamp a rounding residue: KL >= 0 (NaN kept)
    out.mr = mr;
    out.log_sr = log_sr;
  }
  return out;
}

// row_fwd with the multiply by 1/T only where T != 1.
template <typename T, bool ENT, bool KL>
RowOut row_fwd_for_temp(const T* x, int64_t sx, const T* z, int64_t sz, int64_t V, float inv_temp, float* bx,
                        float* bz) {
  return inv_temp == 1.f ? row_fwd<T, ENT, KL, false>(x, sx, z, sz, V, inv_temp, bx, bz)
                         : row_fwd<T, ENT, KL, true>(x, sx, z, sz, V, inv_temp, bx, bz);
}

// c_v = c0 + c1 log p_v + g_kl log q_v; grad_v = g_logp 1[v == label] - p_v c_v (0 where p_v == 0, i.e.
// masked vocabulary, where c_v may be +-inf; a NaN p_v stays NaN).
// fp32 rows, contiguous, are read and written straight from the compute loop (no scratch passes):
// full_kl backward 256 x 32000, 1 thread: 1.46 -> 1.01 ns per element pair. 16-bit rows keep the
// separate convert passes: converting inside the exp loop measured 1.96 -> 5.71 ns (bf16), the
// conversion stops that loop vectorising.
template <typename T, bool KL>
void row_bwd(const T* x, int64_t sx, const T* z, int64_t sz, int64_t V, int64_t label, float inv_temp, float m,
             float log_s, float mr, float log_sr, float g_logp, float c0, float c1, float g_kl, float* bx, float* bz,
             T* out) {
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
        const float logp = (to_f32(xc[i]) - m) * inv_temp - log_s;
        const float p = exp_nonpos(logp);
        float c = c0 + c1 * logp;
        if constexpr (KL) c += g_kl * ((to_f32(zc[i]) - mr) * inv_temp - log_sr);
        g[i] = p == 0.f ? 0.f : -p * c;
      }
    } else {
      load_shift_scale(x + start * sx, sx, len, m, inv_temp, bx);
      if constexpr (KL) load_shift_scale(z + start * sz, sz, len, mr, inv_temp, bz);
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const float logp = bx[i] - log_s;
        const float p = exp_nonpos(logp);
        float c = c0 + c1 * logp;
        if constexpr (KL) c += g_kl * (bz[i] - log_sr);
        g[i] = p == 0.f ? 0.f : -p * c;
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

// -> (logp, entropy, kl, stats, stats_ref): logp/entropy/kl [N] fp32 or empty when not asked for (no
// labels: no logp; no z: no kl), stats [N, 2] = (max, log_s), stats_ref [N, 2] (empty without z). Rows
// whose label == ignore_index read nothing and yield zeros.
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
  at::Tensor logp = maybe(has_labels), ent = maybe(entropy), kl = maybe(has_z);
  at::Tensor stats = at::empty({N, 2}, opts), stats_ref = has_z ? at::empty({N, 2}, opts) : at::empty({0}, opts);
  const int64_t* lab_p = has_labels ? lab.const_data_ptr<int64_t>() : nullptr;
  float* logp_p = has_labels ? logp.data_ptr<float>() : nullptr;
  float* ent_p = entropy ? ent.data_ptr<float>() : nullptr;
  float* kl_p = has_z ? kl.data_ptr<float>() : nullptr;
  float* st_p = stats.data_ptr<float>();
  float* st_ref_p = has_z ? stats_ref.data_ptr<float>() : nullptr;
  const float inv_temp = static_cast<float>(inv_temp_d);
  const int64_t sx = x3.stride(2), sz = has_z ? z3_opt->stride(2) : 0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x3.scalar_type(), "vocab_stats_fwd", [&] {
    at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
      alignas(64) float bx[kChunk];
      alignas(64) float bz[kChunk];
      for (int64_t n = begin; n < end; ++n) {
        const int64_t label = has_labels ? lab_p[n] : -1;
        if (has_labels && label == ignore_index) {
          logp_p[n] = 0.f;
          st_p[2 * n] = st_p[2 * n + 1] = 0.f;
          if (ent_p) ent_p[n] = 0.f;
          if (kl_p) kl_p[n] = st_ref_p[2 * n] = st_ref_p[2 * n + 1] = 0.f;
          continue;
        }
        const scalar_t* x = row_ptr<scalar_t>(x3, n);
        const scalar_t* z = has_z ? row_ptr<scalar_t>(*z3_opt, n) : nullptr;
        RowOut r;
        if (has_z)
          r = entropy ? row_fwd_for_temp<scalar_t, true, true>(x, sx, z, sz, V, inv_temp, bx, bz)
                      : row_fwd_for_temp<scalar_t, false, true>(x, sx, z, sz, V, inv_temp, bx, bz);
        else
          r = entropy ? row_fwd_for_temp<scalar_t, true, false>(x, sx, z, sz, V, inv_temp, bx, bz)
                      : row_fwd_for_temp<scalar_t, false, false>(x, sx, z, sz, V, inv_temp, bx, bz);
        st_p[2 * n] = r.m;
        st_p[2 * n + 1] = r.log_s;
        if (has_labels) {
          const float x_label = (label >= 0 && label < V) ? to_f32(x[label * sx]) : kNegInf;
          logp_p[n] = (x_label - r.m) * inv_temp - r.log_s;
        }
        if (ent_p) ent_p[n] = r.entropy;
        if (kl_p) {
          kl_p[n] = r.kl;
          st_ref_p[2 * n] = r.mr;
          st_ref_p[2 * n + 1] = r.log_sr;
        }
      }
    });
  });
  return {logp, ent, kl, stats, stats_ref};
}

// Gradient w.r.t. the logits of sum(g_logp logp + g_ent entropy + g_kl kl); an absent upstream
// gradient contributes nothing. stats / stats_ref: [N, 2] (max, log_s) from stats_fwd.
// -> [N, V] contiguous in the logits' dtype.
inline at::Tensor stats_bwd(const at::Tensor& x3, const std::optional<at::Tensor>& z3_opt,
                            const std::optional<at::Tensor>& labels_opt, const at::Tensor& stats,
                            const std::optional<at::Tensor>& stats_ref_opt, const std::optional<at::Tensor>& ent_opt,
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
  TORCH_CHECK(!with_kl || (kl_opt.has_value() && stats_ref_opt.has_value()), op,
              ": kl gradient needs kl and stats_ref");
  if (with_kl) TORCH_CHECK(z3_opt->scalar_type() == x3.scalar_type(), op, ": ref_logits must have the logits' dtype");
  TORCH_CHECK(stats.numel() == 2 * N, op, ": stats must be [N, 2]");
  at::Tensor lab = has_labels ? labels_opt->to(at::kLong).contiguous() : at::Tensor();
  const at::Tensor st_c = stats.contiguous();
  const at::Tensor ent_c = with_ent ? ent_opt->contiguous() : at::Tensor();
  const at::Tensor kl_c = with_kl ? kl_opt->contiguous() : at::Tensor();
  const at::Tensor st_ref_c = with_kl ? stats_ref_opt->contiguous() : at::Tensor();
  if (with_kl) TORCH_CHECK(st_ref_c.numel() == 2 * N, op, ": stats_ref must be [N, 2]");
  at::Tensor grad = at::empty({N, V}, x3.options());
  const float inv_temp = static_cast<float>(inv_temp_d);
  const int64_t sx = x3.stride(2), sz = with_kl ? z3_opt->stride(2) : 0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x3.scalar_type(), "vocab_stats_bwd", [&] {
    scalar_t* grad_p = grad.data_ptr<scalar_t>();
    at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
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
        float c0 = g_logp, c1 = 0.f, g_kl = 0.f, mr = 0.f, log_sr = 0.f;
        if (with_ent) {
          const float ge = g_en.const_data_ptr<float>()[n] * inv_temp;
          c0 += ge * ent_c.const_data_ptr<float>()[n];
          c1 += ge;
        }
        if (with_kl) {
          g_kl = g_k.const_data_ptr<float>()[n] * inv_temp;
          c0 += g_kl * kl_c.const_data_ptr<float>()[n];
          c1 -= g_kl;
          mr = st_ref_c.const_data_ptr<float>()[2 * n];
          log_sr = st_ref_c.const_data_ptr<float>()[2 * n + 1];
        }
        const scalar_t* x = row_ptr<scalar_t>(x3, n);
        const float m = st_c.const_data_ptr<float>()[2 * n], log_s = st_c.const_data_ptr<float>()[2 * n + 1];
        if (with_kl)
          row_bwd<scalar_t, true>(x, sx, row_ptr<scalar_t>(*z3_opt, n), sz, V, label, inv_temp, m, log_s, mr, log_sr,
                                  g_logp, c0, c1, g_kl, bx, bz, out);
        else
          row_bwd<scalar_t, false>(x, sx, nullptr, 0, V, label, inv_temp, m, log_s, 0.f, 0.f, g_logp, c0, c1, 0.f, bx,
                                   bz, out);
      }
    });
  });
  return grad;
}

}  // namespace rlhf::vocab
