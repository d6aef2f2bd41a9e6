// kernels.value_loss on CPU: the clipped value loss + clip fraction forward and its backward
// (gradient to values), the math of kernels/value_loss.py. Fixed kChunk chunks summed in fp32 and
// added in double, in order: the result does not depend on the thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_math.h"
#include "rl_math.h"

namespace rlhf {
namespace {

struct ValueToken {
  float diff, e1, e2, l1, l2;  // values - old_values, values - returns, values_clipped - returns, squares
  bool in_range;               // |values - old_values| <= clip
};

// A masked token (valid == false) computes on zeros (losses 0), so NaN/inf padding never enters.
__attribute__((always_inline)) inline ValueToken value_token(bool valid, float v, float old, float ret, float clip) {
  ValueToken k;
  v = keep_if(v, valid), old = keep_if(old, valid), ret = keep_if(ret, valid);
  k.diff = v - old;
  k.e1 = v - ret;
  // inside the clip range the clipped value is `v` itself, not old + (v - old), which can be an ulp off
  k.in_range = std::fabs(k.diff) <= clip;
  k.e2 = keep_if(v, k.in_range) + keep_if(old + minf(maxf(k.diff, -clip), clip), !k.in_range) - ret;
  k.l1 = k.e1 * k.e1;
  k.l2 = k.e2 * k.e2;
  return k;
}

struct Partial {
  double loss = 0, count = 0, clipped = 0;
};

// One chunk (<= kChunk tokens): fp32 sums, handed on in double. Loops with one or two reductions
// and bit masks instead of branches vectorise (see rl_math.h).
template <typename T>
__attribute__((noinline)) Partial value_chunk(const T* v, const T* old, const T* ret, const uint8_t* m, int64_t n,
                                              float clip) {
  float loss = 0.f, clipped = 0.f, count = 0.f;
#pragma omp simd reduction(+ : loss, clipped)
  for (int64_t i = 0; i < n; ++i) {
    const bool valid = m[i] != 0;
    const ValueToken k = value_token(valid, to_f32(v[i]), to_f32(old[i]), to_f32(ret[i]), clip);
    loss += maxf(k.l1, k.l2);  // 0 at masked tokens
    clipped += keep_if(1.f, valid & (k.l2 > k.l1));
  }
#pragma omp simd reduction(+ : count)
  for (int64_t i = 0; i < n; ++i) count += static_cast<float>(m[i] != 0);
  Partial p;
  p.loss = loss;
  p.count = count;
  p.clipped = clipped;
  return p;
}

// d (0.5 * max(l1, l2)) / d values * scale; ties split evenly, as torch.maximum does.
template <typename T>
__attribute__((noinline)) void value_grad_range(const T* v, const T* old, const T* ret, const uint8_t* m, int64_t n,
                                                float clip, float scale, T* grad) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const bool valid = m[i] != 0;
    const ValueToken k = value_token(valid, to_f32(v[i]), to_f32(old[i]), to_f32(ret[i]), clip);
    // 0.5 * d/dv of a square is the residual: the 0.5 and the 2 cancel
    const float g2 = keep_if(k.e2, k.in_range);
    const bool gt1 = k.l1 > k.l2, gt2 = k.l2 > k.l1;
    const float g = keep_if(k.e1, gt1) + keep_if(g2, gt2) + keep_if(0.5f * (k.e1 + g2), !(gt1 | gt2));
    grad[i] = static_cast<T>(keep_if(g * scale, valid));
  }
}

void check_inputs(const at::Tensor& v, const at::Tensor& old, const at::Tensor& ret, const at::Tensor& m,
                  const char* op) {
  TORCH_CHECK(v.is_contiguous() && old.is_contiguous() && ret.is_contiguous() && m.is_contiguous(), op,
              ": inputs must be contiguous");
  TORCH_CHECK(old.numel() == v.numel() && ret.numel() == v.numel() && m.numel() == v.numel(), op,
              ": inputs must have the same number of elements");
  TORCH_CHECK(old.scalar_type() == v.scalar_type() && ret.scalar_type() == v.scalar_type(), op,
              ": values, old_values and returns must share a dtype");
  TORCH_CHECK(m.scalar_type() == at::kByte, op, ": mask must be uint8");
  TORCH_CHECK(v.device().is_cpu(), op, " (cpp): tensors must be on CPU");
}

// -> [4] fp32: (vf_loss, vf_clipfrac, count, 0).
at::Tensor value_loss_fwd(const at::Tensor& v, const at::Tensor& old, const at::Tensor& ret, const at::Tensor& m,
                          double clip_d) {
  check_inputs(v, old, ret, m, "value_loss_fwd");
  const int64_t N = v.numel(), n_chunks = (N + kChunk - 1) / kChunk;
  const float clip = static_cast<float>(clip_d);
  std::vector<Partial> parts(n_chunks);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.scalar_type(), "value_loss_fwd", [&] {
    const scalar_t* v_p = v.const_data_ptr<scalar_t>();
    const scalar_t* o_p = old.const_data_ptr<scalar_t>();
    const scalar_t* r_p = ret.const_data_ptr<scalar_t>();
    const uint8_t* m_p = m.const_data_ptr<uint8_t>();
    at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t start = c * kChunk, len = std::min(N, start + kChunk) - start;
        parts[c] = value_chunk(v_p + start, o_p + start, r_p + start, m_p + start, len, clip);
      }
    });
  });
  Partial t;
  for (const Partial& p : parts) {
    t.loss += p.loss;
    t.count += p.count;
    t.clipped += p.clipped;
  }
  const double denom = std::max(t.count, 1.0);
  at::Tensor out = at::zeros({4}, v.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  o[0] = static_cast<float>(0.5 * t.loss / denom);
  o[1] = static_cast<float>(t.clipped / denom);
  o[2] = static_cast<float>(t.count);
  return out;
}

at::Tensor value_loss_bwd(const at::Tensor& v, const at::Tensor& old, const at::Tensor& ret, const at::Tensor& m,
                          const at::Tensor& out, const at::Tensor& grad_out, double clip_d) {
  check_inputs(v, old, ret, m, "value_loss_bwd");
  const int64_t N = v.numel();
  const float clip = static_cast<float>(clip_d);
  const float count = out.to(at::kFloat).contiguous().const_data_ptr<float>()[2];
  const float scale = grad_out.to(at::kFloat).item<float>() / std::max(count, 1.f);
  at::Tensor grad = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.scalar_type(), "value_loss_bwd", [&] {
    const scalar_t* v_p = v.const_data_ptr<scalar_t>();
    const scalar_t* o_p = old.const_data_ptr<scalar_t>();
    const scalar_t* r_p = ret.const_data_ptr<scalar_t>();
    const uint8_t* m_p = m.const_data_ptr<uint8_t>();
    scalar_t* g_p = grad.data_ptr<scalar_t>();
    at::parallel_for(0, N, kChunk, [&](int64_t begin, int64_t end) {
      value_grad_range(v_p + begin, o_p + begin, r_p + begin, m_p + begin, end - begin, clip, scale, g_p + begin);
    });
  });
  return grad;
}

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_FRAGMENT(rlhf_kernels, m) {
  m.def("value_loss_fwd(Tensor values, Tensor old_values, Tensor returns, Tensor mask, float clip) -> Tensor");
  m.def(
      "value_loss_bwd(Tensor values, Tensor old_values, Tensor returns, Tensor mask, Tensor out, Tensor grad_out, "
      "float clip) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("value_loss_fwd", &rlhf::value_loss_fwd);
  m.impl("value_loss_bwd", &rlhf::value_loss_bwd);
}
