// kernels.gumbel_argmax on CPU: the sampler's Gumbel-max draw argmax_v(logits[b, v] + g(stream_b, step, v))
// in one pass over each row, without the (B, V) noise; the math of kernels/gumbel_argmax.py.
//
// The noise, exactly as gumbel_noise (the torch reference) computes it in wrapping int64 arithmetic:
//   at_step = mix(stream ^ ((step + 1) * kStep)),  bits = mix(at_step + v * kGolden)   (mod 2^64)
//   u = ((bits >> 11) + 0.5) * 2^-53 in (0, 1),     g = -log(-log(u))                  (double)
// with mix splitmix64's finaliser and >> a logical shift (uint64 here; the reference masks torch's
// arithmetic shift). The value is (double)logit + g; the first maximum wins (torch.argmax: the lowest index
// among equals, a NaN beats everything).
//
// Pruning, exact: telling that an entry cannot win needs no log. log(u) <= u - 1 gives
// -log(u) >= 1 - u >= 2^-(n1 + 1), with n1 the number of leading one bits of `bits` (for n1 <= 52 bit n1
// from the top of u's 53-bit fraction is 0, so u <= 1 - 2^-(n1 + 1); else 1 - u >= 2^-54), so
// g <= (n1 + 1) ln 2. An entry with logit + (n1 + 1) ln 2 + kSlack <= best cannot beat `best` (rounding
// is monotone), so only the rest take the two logs. Blocks of kBlock entries first compute that bound for
// every entry (branch-free integer work) and are skipped whole when none can win. Skipped entries are
// exactly those that could not change the argmax, so the result is what the unpruned scan returns; -inf
// logits (top-k / top-p filtered) never take the logs.
//
// The only difference from the reference is the last ulp of log(): std::log here, torch's vectorised
// log there. A draw can differ only where two values of a row tie to within an ulp
// (tests/test_gumbel_argmax.py compares the two on many rows).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace rlhf {
namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kC1 = 0xBF58476D1CE4E5B9ULL;
constexpr uint64_t kC2 = 0x94D049BB133111EBULL;
constexpr uint64_t kStep = 0xD1B54A32D192ED03ULL;
constexpr double kLn2 = 0.69314718055599453;
// Covers the rounding of both logs and of kLn2 in the bound (relative errors ~1e-16 on values <= 45).
constexpr double kSlack = 1e-9;
constexpr int64_t kBlock = 256;
// Fewest entries a thread scans of one row when rows are split across threads (B < threads).
constexpr int64_t kMinChunk = 4096;
constexpr double kNegInfD = -std::numeric_limits<double>::infinity();

__attribute__((always_inline)) inline uint64_t mix(uint64_t x) {
  x = (x ^ (x >> 30)) * kC1;
  x = (x ^ (x >> 27)) * kC2;
  return x ^ (x >> 31);
}

// (n1 + 1) ln 2 + kSlack >= g(bits): the bound of the header comment.
__attribute__((always_inline)) inline double gumbel_bound(uint64_t bits) {
  const uint64_t inv = ~bits;
  const int n1 = inv == 0 ? 64 : __builtin_clzll(inv);
  return static_cast<double>(n1 + 1) * kLn2 + kSlack;
}

__attribute__((always_inline)) inline double gumbel(uint64_t bits) {
  const double u = (static_cast<double>(bits >> 11) + 0.5) * 0x1p-53;
  return -std::log(-std::log(u));
}

struct Best {
  double value;
  int64_t index;
};

// The first maximum of logits[v] + g(v) over v in [v0, v1); (-inf, v0) when every value is -inf.
template <typename T>
Best scan(const T* logits, int64_t v0, int64_t v1, uint64_t at_step) {
  Best best{kNegInfD, v0};
  for (int64_t b0 = v0; b0 < v1; b0 += kBlock) {
    const int64_t b1 = std::min(b0 + kBlock, v1);
    // pass 1: the block's largest upper bound (and whether it holds a NaN): no logs, vectorisable
    double top = kNegInfD;
    bool nan = false;
#pragma omp simd reduction(max : top) reduction(| : nan)
    for (int64_t v = b0; v < b1; ++v) {
      const double x = static_cast<double>(logits[v]);
      const double t = x + gumbel_bound(mix(at_step + static_cast<uint64_t>(v) * kGolden));
      top = t > top ? t : top;
      nan = nan | (x != x);
    }
    if (!(top > best.value) && !nan) continue;
    // pass 2: the exact value of every entry whose bound beats the running best
    for (int64_t v = b0; v < b1; ++v) {
      const double x = static_cast<double>(logits[v]);
      const uint64_t bits = mix(at_step + static_cast<uint64_t>(v) * kGolden);
      if (x + gumbel_bound(bits) <= best.value) continue;  // false for a NaN x
      const double value = x + gumbel(bits);
      if (!(value <= best.value)) {  // greater, or NaN
        best = Best{value, v};
        if (value != value) return best;  // the first NaN wins
      }
    }
  }
  return best;
}

template <typename T>
void gumbel_argmax_rows(const T* logits, int64_t row_stride, const int64_t* streams, int64_t step, int64_t B,
                        int64_t V, int64_t* out) {
  const uint64_t step_key = static_cast<uint64_t>(step + 1) * kStep;
  // Split each row into `chunks` when there are fewer rows than threads (B = 1 at evaluation): every
  // thread gets work, each chunk keeps its own first maximum, and the chunks reduce in index order.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t chunks = B >= threads ? 1 : (threads + B - 1) / B;
  chunks = std::max<int64_t>(1, std::min(chunks, V / kMinChunk));
  const int64_t per_chunk = (V + chunks - 1) / chunks;
  std::vector<Best> found(static_cast<size_t>(B * chunks));
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, c = task % chunks;
      const uint64_t at_step = mix(static_cast<uint64_t>(streams[b]) ^ step_key);
      const int64_t v0 = std::min(V, c * per_chunk), v1 = std::min(V, v0 + per_chunk);
      found[static_cast<size_t>(task)] = scan(logits + b * row_stride, v0, v1, at_step);
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    Best best = found[static_cast<size_t>(b * chunks)];
    for (int64_t c = 1; c < chunks; ++c) {
      const Best& next = found[static_cast<size_t>(b * chunks + c)];
      if (best.value != best.value) break;           // a NaN in an earlier chunk
      if (!(next.value <= best.value)) best = next;  // greater, or NaN; ties keep the lower index
    }
    out[b] = best.index;
  }
}

at::Tensor gumbel_argmax(const at::Tensor& logits, const at::Tensor& streams, int64_t step) {
  TORCH_CHECK(logits.device().is_cpu() && streams.device().is_cpu(), "gumbel_argmax (cpp): tensors must be on CPU");
  TORCH_CHECK(logits.dim() == 2 && (logits.size(1) <= 1 || logits.stride(1) == 1),
              "gumbel_argmax: logits must be (B, V) with unit stride along V");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
              "gumbel_argmax: logits must be float32 or float64");
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0, "gumbel_argmax: the vocabulary is empty");
  TORCH_CHECK(streams.scalar_type() == at::kLong && streams.dim() == 1 && streams.size(0) == B &&
                  streams.is_contiguous(),
              "gumbel_argmax: streams must be a contiguous int64 (B,) tensor");
  at::Tensor out = at::empty({B}, streams.options());
  if (B == 0) return out;
  const int64_t* s = streams.const_data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  if (logits.scalar_type() == at::kFloat) {
    gumbel_argmax_rows(logits.const_data_ptr<float>(), logits.stride(0), s, step, B, V, o);
  } else {
    gumbel_argmax_rows(logits.const_data_ptr<double>(), logits.stride(0), s, step, B, V, o);
  }
  return out;
}

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_FRAGMENT(rlhf_kernels, m) { m.def("gumbel_argmax(Tensor logits, Tensor streams, int step) -> Tensor"); }

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) { m.impl("gumbel_argmax", &rlhf::gumbel_argmax); }
