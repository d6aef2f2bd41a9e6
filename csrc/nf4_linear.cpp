// kernels.nf4_linear on CPU: y = x @ dequant(W).T (+ bias) and grad_x = grad_y @ dequant(W) for a
// weight stored as bitsandbytes stores an NF4 Params4bit, the math of kernels/nf4_linear.py.
//
// Storage (bitsandbytes 0.50, any [N, K]): the N*K weights in row-major order form one flat sequence,
// cut into blocks of `blocksize` (a block may span two rows when K is not a multiple of it). Element e
// is nibble e of the packed bytes, the high nibble first (byte e/2, high if e is even), and dequantizes
// to code[nibble] * scale[e / blocksize] in fp32. The scale is the fp32 absmax, or with double quant
// code2[absmax_u8[b]] * absmax2[b / blocksize2] + offset, rounded after the product and after the sum
// (bitsandbytes' dequantize_blockwise, then `absmax += offset`): every weight equals
// bitsandbytes.functional.dequantize_4bit bit for bit (tests/test_nf4_linear.py).
//
// Three paths by M, the rows of x. Timings on this 2-core AMD EPYC (Zen 4, AVX-512; 32 KiB L1d and
// 1 MiB L2 per core), min of 200 runs on a shared machine, 2026-12-07, as a ratio to at::mm of x with the
// already dequantized fp32 weight (MKL), over the four SmolLM2-135M projections (576x576, 576->192,
// 576->1536, 1536->576):
//  - M <= kFusedMaxRows: fused. Tiles of kNR weight rows are dequantized into an L1 buffer and
//    multiplied there by a register-blocked kMR x kNR dot-product kernel (fp32 FMA accumulation); threads
//    split the tiles. Reads the packed weight (0.5 B/weight, not fp32's 4) once and writes nothing else.
//    2 threads: M = 8: 0.65-0.71x; M = 16: 0.78-0.94x; M = 32: 0.88-0.99x; M = 64: 1.03-1.21x.
//  - M <= kTiledMaxRows: tiles of ~kTileBytes of weight rows are dequantized into a per-thread L2
//    buffer and each multiplied by one single-threaded at::mm into its columns of y; threads split the
//    tiles. 2 threads: M = 8: 0.93-1.20x; M = 32: 0.84-1.06x; M = 64: 0.97-1.07x.
//  - larger M (training): the tiled path on chunks of kTiledMaxRows rows of x, each chunk dequantizing
//    the weight again: 1.01-1.04x at::mm at M = 384-1024, where the whole weight dequantized into a fresh
//    fp32 [N, K] and one multithreaded at::mm (the path before) took 1.06-1.18x (medians of 15, summed
//    over the four projections, 2 threads, quiet, 2026-12-07).
// The backward (grad_x = grad_y @ W, any M): the whole weight dequantized, one multithreaded at::mm
// (1.02-1.11x at::mm at M = 128-1024). Column tiles of W (every row's span [k0, k1) dequantized into a
// per-thread buffer, one single-threaded at::mm into grad_x's columns) were tried and took 1.23-1.35x.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace rlhf {
namespace {

// ---------------------------------------------------------------------------------------------------
// Vector width and register blocking
// ---------------------------------------------------------------------------------------------------
#if defined(__AVX512F__)
constexpr int kLanes = 16;
// 24 zmm accumulators + 6 weight vectors + 1 x vector of the 32 registers. Measured against 6x4, 8x3,
// 5x4 and 7x3 (one thread, fused vs at::mm at M = 8 / 32 / 64, 576x576): 0.98 / 1.15 / 1.17 of at::mm's
// time, the others 1.00-1.23 / 1.19-1.21 / 1.20-1.31.
constexpr int kMR = 4, kNR = 6;
using vf = __m512;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kLanes = 8;
constexpr int kMR = 2, kNR = 4;  // 8 ymm accumulators + 4 weight vectors + 1 x vector of 16 registers
using vf = __m256;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(vf a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#else
constexpr int kLanes = 1;
constexpr int kMR = 2, kNR = 4;
using vf = float;
inline vf vzero() { return 0.f; }
inline vf vload(const float* p) { return *p; }
inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
inline float vsum(vf a) { return a; }
#endif

// Path limits (see the top of the file): fused and tiled break even at M = 24-32 with 2 threads; one
// thread favours the tiled path from M = 16 (MKL's 90-100 GFLOP/s against the fused kernel's 75-85).
constexpr int64_t kFusedMaxRows = 32;
constexpr int64_t kTiledMaxRows = 256;
// Weight-tile buffer of the tiled path: 768 KiB of a 1 MiB L2 (tiles of 192-288 rows at K = 576 ran
// 1.10-1.13x at::mm at M = 32, 96-row tiles 1.16-1.18x, 48-row 1.23-1.25x: per-call costs).
constexpr int64_t kTileBytes = 768 << 10;

// ---------------------------------------------------------------------------------------------------
// The weight and its dequantization
// ---------------------------------------------------------------------------------------------------
struct Nf4Weight {
  const uint8_t* packed;    // [(N*K+1)/2] two 4-bit codes per byte, element 2i in the high nibble
  const float* absmax;      // [n_blocks] fp32 block scales (plain quant), or nullptr
  const uint8_t* absmax_q;  // [n_blocks] 8-bit block scales (double quant), or nullptr
  const float* absmax2;     // [ceil(n_blocks / blocksize2)] their fp32 scales (double quant)
  const float* code2;       // [256] their 8-bit code (double quant)
  float code[16];           // the 16 NF4 levels
  float offset;             // added to every double-quant scale
  int64_t blocksize, blocksize2, N, K;
  int shift, shift2;  // log2 of the block sizes (powers of two: bitsandbytes allows 32 ... 4096, nested 256)

  // Scale of block b. With double quant the product is rounded to fp32 before the offset is added, as
  // bitsandbytes does (two fp32 ops); the empty asm keeps GCC (-ffp-contract=fast) from fusing them
  // into one FMA, which rounds once: without it GCC 12 does, and 12 of the bit-for-bit tests fail.
  inline float scale(int64_t b) const {
    if (absmax != nullptr) return absmax[b];
    float p = code2[absmax_q[b]] * absmax2[b >> shift2];
#if defined(__x86_64__)
    asm("" : "+x"(p));
#else
    volatile float vp = p;
    p = vp;
#endif
    return p + offset;
  }
  inline float nibble_value(int64_t e) const {
    const uint8_t byte = packed[e >> 1];
    return code[(e & 1) ? (byte & 15) : (byte >> 4)];
  }
};

#if defined(__AVX512F__)
// 32 weights from the 16 bytes at p: the high and low nibbles interleaved back into element order as
// bytes, widened to 32-bit indices, and one permute per 16 looks them up in the 16-entry table held in a
// register (7 instructions per 16 weights; 10 when 8 bytes at a time are widened to 16 bits first).
inline void dequant_vec32(const uint8_t* p, __m512 table, __m512 s, float* dst) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(15);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
  const __m128i lo = _mm_and_si128(b, mask);
  const __m512i i0 = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
  const __m512i i1 = _mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo));
  _mm512_storeu_ps(dst, _mm512_mul_ps(_mm512_permutexvar_ps(i0, table), s));
  _mm512_storeu_ps(dst + 16, _mm512_mul_ps(_mm512_permutexvar_ps(i1, table), s));
}
#elif defined(__AVX2__) && defined(__FMA__)
// 8 weights from the 4 bytes at p: an 8-entry permute of each table half, bit 3 of the nibble picks.
inline void dequant_vec(const uint8_t* p, __m256 table_lo, __m256 table_hi, __m256 s, float* dst) {
  int32_t four;
  std::memcpy(&four, p, 4);
  const __m128i b16 = _mm_cvtepu8_epi16(_mm_cvtsi32_si128(four));
  const __m128i hi = _mm_srli_epi16(b16, 4);
  const __m128i lo = _mm_and_si128(b16, _mm_set1_epi16(15));
  const __m256i idx = _mm256_cvtepu8_epi32(_mm_or_si128(hi, _mm_slli_epi16(lo, 8)));
  const __m256 a = _mm256_permutevar8x32_ps(table_lo, idx);
  const __m256 b = _mm256_permutevar8x32_ps(table_hi, idx);
  const __m256 w = _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
  _mm256_storeu_ps(dst, _mm256_mul_ps(w, s));
}
#endif

// Dequantize the flat elements [e0, e0 + len) into dst[0, len): rows n0..n1 of W are the flat range
// [n0 K, n1 K), so a tile of rows is one call. A span may start on a low nibble (odd K): one scalar
// element first; block starts are even (blocksize >= 32), so every later segment starts on a byte.
void dequant_span(const Nf4Weight& w, int64_t e0, int64_t len, float* dst) {
#if defined(__AVX512F__)
  const __m512 table = _mm512_loadu_ps(w.code);
#elif defined(__AVX2__) && defined(__FMA__)
  const __m256 table_lo = _mm256_loadu_ps(w.code), table_hi = _mm256_loadu_ps(w.code + 8);
#endif
  const int64_t end = e0 + len;
  int64_t e = e0;
  while (e < end) {
    // shifts, not divisions: a 64-bit division per 64-weight block cost a third of dequantizing it
    // (the whole 576x576 weight, one thread: 37 us with `e / blocksize`, 25 us with shifts)
    const int64_t b = e >> w.shift;
    const int64_t seg_end = std::min(end, (b + 1) << w.shift);
    const float s = w.scale(b);
    if (e & 1) {
      dst[e - e0] = w.nibble_value(e) * s;
      ++e;
    }
#if defined(__AVX512F__)
    const __m512 sv = _mm512_set1_ps(s);
    for (; e + 32 <= seg_end; e += 32) dequant_vec32(w.packed + (e >> 1), table, sv, dst + (e - e0));
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256 sv = _mm256_set1_ps(s);
    for (; e + kLanes <= seg_end; e += kLanes)
      dequant_vec(w.packed + (e >> 1), table_lo, table_hi, sv, dst + (e - e0));
#endif
    for (; e < seg_end; ++e) dst[e - e0] = w.nibble_value(e) * s;
  }
}

// The whole weight as fp32 [N, K], both threads (chunks of whole blocks).
at::Tensor dequant_all(const Nf4Weight& w, const at::TensorOptions& opts) {
  at::Tensor out = at::empty({w.N, w.K}, opts.dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const int64_t n = w.N * w.K;
  const int64_t n_blocks = (n + w.blocksize - 1) / w.blocksize;
  const int64_t grain = std::max<int64_t>(1, 16384 / w.blocksize);  // 64 KiB of output per task at least
  at::parallel_for(0, n_blocks, grain, [&](int64_t b0, int64_t b1) {
    const int64_t e0 = b0 * w.blocksize, e1 = std::min(n, b1 * w.blocksize);
    dequant_span(w, e0, e1 - e0, o + e0);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Fused small-M forward
// ---------------------------------------------------------------------------------------------------
// Sums of the lanes of NR accumulators, into out[0, NR) (+ bias). Four at a time: each 16-lane vector
// is folded to 8 lanes, then horizontal adds combine the four (13 shuffles/adds for four sums instead of
// 4 x 8); at K = 576 the per-tile reduction otherwise costs a fifth of the FMA time.
template <int NR>
__attribute__((always_inline)) inline void store_sums(const vf* acc, const float* bias, float* out) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#pragma GCC unroll 4
  for (int j0 = 0; j0 < NR; j0 += 4) {
    __m256 h[4];
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      if (j0 + q >= NR) {
        h[q] = _mm256_setzero_ps();
      } else {
#if defined(__AVX512F__)
        h[q] = _mm256_add_ps(_mm512_castps512_ps256(acc[j0 + q]), _mm512_extractf32x8_ps(acc[j0 + q], 1));
#else
        h[q] = acc[j0 + q];
#endif
      }
    }
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    if (j0 + 4 <= NR) {
      if (bias != nullptr) s = _mm_add_ps(s, _mm_loadu_ps(bias + j0));
      _mm_storeu_ps(out + j0, s);
    } else {
      float tmp[4];
      _mm_storeu_ps(tmp, s);
      for (int q = 0; j0 + q < NR; ++q) out[j0 + q] = bias != nullptr ? tmp[q] + bias[j0 + q] : tmp[q];
    }
  }
#else
  for (int j = 0; j < NR; ++j) out[j] = bias != nullptr ? vsum(acc[j]) + bias[j] : vsum(acc[j]);
#endif
}

// y[i, j] = sum_k x[i, k] w[j, k] (+ bias[j]) for an MR x NR tile: x rows (stride ldx), w rows
// (stride K, from the L1 tile buffer), y rows (stride ldy). Accumulators are kLanes-wide partial sums
// along k, reduced once at the end; the K % kLanes tail is added in scalar fp32.
template <int MR, int NR>
__attribute__((always_inline)) inline void micro_kernel(const float* x, int64_t ldx, const float* w, int64_t K,
                                                        const float* bias, float* y, int64_t ldy) {
  vf acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = vzero();
  const int64_t kv = K - K % kLanes;
  for (int64_t k = 0; k < kv; k += kLanes) {
    vf wv[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) wv[j] = vload(w + j * K + k);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const vf xv = vload(x + i * ldx + k);
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) acc[i][j] = vfma(xv, wv[j], acc[i][j]);
    }
  }
  if (kv == K) {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) store_sums<NR>(acc[i], bias, y + i * ldy);
    return;
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      float s = vsum(acc[i][j]);
      for (int64_t k = kv; k < K; ++k) s += x[i * ldx + k] * w[j * K + k];
      y[i * ldy + j] = bias != nullptr ? s + bias[j] : s;
    }
  }
}

// The remaining R < kMR rows of x against an NR-row tile, as one R x NR kernel.
template <int NR, int R = kMR - 1>
__attribute__((always_inline)) inline void tail_rows(int64_t r, const float* x, int64_t K, const float* w,
                                                     const float* bias, float* y, int64_t ldy) {
  if constexpr (R >= 1) {
    if (r == R) return micro_kernel<R, NR>(x, K, w, K, bias, y, ldy);
    tail_rows<NR, R - 1>(r, x, K, w, bias, y, ldy);
  }
}

// Every row of x [M, K] against an NR-row tile of W: y[:, 0:NR] (row stride ldy).
template <int NR>
void rows_times_tile(const float* x, int64_t M, int64_t K, const float* w, const float* bias, float* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + kMR <= M; m += kMR) micro_kernel<kMR, NR>(x + m * K, K, w, K, bias, y + m * ldy, ldy);
  if (m < M) tail_rows<NR>(M - m, x + m * K, K, w, bias, y + m * ldy, ldy);
}

// The last tile of R < kNR weight rows.
template <int R = kNR - 1>
void tail_tile(int64_t r, const float* x, int64_t M, int64_t K, const float* w, const float* bias, float* y,
               int64_t ldy) {
  if constexpr (R >= 1) {
    if (r == R) return rows_times_tile<R>(x, M, K, w, bias, y, ldy);
    tail_tile<R - 1>(r, x, M, K, w, bias, y, ldy);
  }
}

void fused_forward(const Nf4Weight& w, const float* x, int64_t M, const float* bias, float* y) {
  const int64_t N = w.N, K = w.K;
  const int64_t n_tiles = (N + kNR - 1) / kNR;
  at::parallel_for(0, n_tiles, 1, [&](int64_t t0, int64_t t1) {
    // 64-byte aligned (so are torch's tensors): a zmm load that straddles two cache lines costs two
    // (M = 1, 576x576, one thread: 33.9 us from std::vector's 16-byte alignment, 27.6 us aligned).
    std::vector<float> storage(static_cast<size_t>(kNR * K + 16));
    float* tile = storage.data() + ((64 - reinterpret_cast<uintptr_t>(storage.data()) % 64) % 64) / sizeof(float);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kNR, nr = std::min<int64_t>(kNR, N - n0);
      dequant_span(w, n0 * K, nr * K, tile);
      const float* b = bias != nullptr ? bias + n0 : nullptr;
      if (nr == kNR) {
        rows_times_tile<kNR>(x, M, K, tile, b, y + n0, N);
      } else {
        tail_tile(nr, x, M, K, tile, b, y + n0, N);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// Tiled dequantize + at::mm (mid-size M)
// ---------------------------------------------------------------------------------------------------
// A grow-only fp32 buffer per thread, 64-byte aligned (at most kTileBytes plus a row): a fresh
// allocation of this size each call would be fresh pages each call.
float* thread_buffer(int64_t n) {
  thread_local std::vector<float> storage;
  if (storage.size() < static_cast<size_t>(n + 16)) storage.resize(static_cast<size_t>(n + 16));
  return storage.data() + ((64 - reinterpret_cast<uintptr_t>(storage.data()) % 64) % 64) / sizeof(float);
}

void tiled_forward(const Nf4Weight& w, const at::Tensor& x_in, const float* bias, at::Tensor& y) {
  const int64_t N = w.N, K = w.K;
  // OpenMP workers do not inherit the caller's thread-local dispatch state: without a detached x,
  // at::mm_out there refuses an x that requires grad (nf4_linear_fwd runs inside an autograd.Function),
  // and under torch.inference_mode it refuses to write y (an inference tensor) unless the worker is in
  // inference mode too.
  const at::Tensor x = x_in.detach();
  const bool inference = c10::InferenceMode::is_enabled();
  // at least one tile per thread, a multiple of the thread count (equal shares), each <= kTileBytes
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t n_tiles = std::max<int64_t>(threads, (N * K * 4 + kTileBytes - 1) / kTileBytes);
  n_tiles = std::min(N, (n_tiles + threads - 1) / threads * threads);
  const int64_t rows = (N + n_tiles - 1) / n_tiles;
  n_tiles = (N + rows - 1) / rows;
  at::parallel_for(0, n_tiles, 1, [&](int64_t t0, int64_t t1) {
    c10::InferenceMode inference_mode(inference);
    float* buf = thread_buffer(rows * K);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * rows, nr = std::min(rows, N - n0);
      dequant_span(w, n0 * K, nr * K, buf);
      const at::Tensor tile = at::from_blob(buf, {nr, K}, x.options());
      at::Tensor out = y.narrow(1, n0, nr);  // [M, nr], row stride N: BLAS writes it in place
      at::mm_out(out, x, tile.t());          // single-threaded inside parallel_for
      if (bias != nullptr) {
        for (int64_t m = 0; m < x.size(0); ++m) {
          float* row = y.data_ptr<float>() + m * N + n0;
#pragma omp simd
          for (int64_t j = 0; j < nr; ++j) row[j] += bias[n0 + j];
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------------
Nf4Weight make_weight(const at::Tensor& packed, const at::Tensor& absmax, const c10::optional<at::Tensor>& absmax2,
                      const c10::optional<at::Tensor>& code2, const at::Tensor& code, double offset,
                      int64_t blocksize, int64_t blocksize2, int64_t N, int64_t K, const char* op) {
  TORCH_CHECK(packed.device().is_cpu() && absmax.device().is_cpu() && code.device().is_cpu(), op,
              " (cpp): tensors must be on CPU");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), op, ": packed must be contiguous uint8");
  TORCH_CHECK(N >= 0 && K >= 0 && packed.numel() == (N * K + 1) / 2, op, ": packed has ", packed.numel(),
              " bytes, expected (N*K+1)/2 = ", (N * K + 1) / 2);
  auto log2_exact = [](int64_t v) {
    int l = 0;
    while (l < 62 && (int64_t{1} << l) < v) ++l;
    return (int64_t{1} << l) == v ? l : -1;
  };
  TORCH_CHECK(blocksize >= 32 && log2_exact(blocksize) >= 0, op, ": blocksize must be a power of two >= 32, got ",
              blocksize);
  const int64_t n_blocks = (N * K + blocksize - 1) / blocksize;
  TORCH_CHECK(absmax.is_contiguous() && absmax.numel() == n_blocks, op, ": absmax must hold ", n_blocks, " scales");
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.is_contiguous() && code.numel() == 16, op,
              ": code must be 16 contiguous fp32 levels");
  Nf4Weight w{};
  w.packed = packed.const_data_ptr<uint8_t>();
  std::memcpy(w.code, code.const_data_ptr<float>(), sizeof(w.code));
  w.offset = static_cast<float>(offset);
  w.blocksize = blocksize;
  w.blocksize2 = blocksize2;
  w.shift = log2_exact(blocksize);
  w.N = N;
  w.K = K;
  if (absmax.scalar_type() == at::kFloat) {
    w.absmax = absmax.const_data_ptr<float>();
  } else {
    TORCH_CHECK(absmax.scalar_type() == at::kByte && absmax2.has_value() && code2.has_value(), op,
                ": absmax must be fp32, or uint8 with absmax2 and code2 (double quant)");
    w.shift2 = log2_exact(blocksize2);
    TORCH_CHECK(w.shift2 >= 0, op, ": blocksize2 must be a power of two, got ", blocksize2);
    const at::Tensor& a2 = *absmax2;
    const at::Tensor& c2 = *code2;
    TORCH_CHECK(a2.device().is_cpu() && c2.device().is_cpu(), op, " (cpp): tensors must be on CPU");
    TORCH_CHECK(a2.scalar_type() == at::kFloat && a2.is_contiguous() &&
                    a2.numel() == (n_blocks + blocksize2 - 1) / blocksize2,
                op, ": absmax2 must hold ceil(n_blocks / blocksize2) fp32 scales");
    TORCH_CHECK(c2.scalar_type() == at::kFloat && c2.is_contiguous() && c2.numel() == 256, op,
                ": code2 must be 256 contiguous fp32 values");
    w.absmax_q = absmax.const_data_ptr<uint8_t>();
    w.absmax2 = a2.const_data_ptr<float>();
    w.code2 = c2.const_data_ptr<float>();
  }
  return w;
}

at::Tensor nf4_dequant(const at::Tensor& packed, const at::Tensor& absmax, const c10::optional<at::Tensor>& absmax2,
                       const c10::optional<at::Tensor>& code2, const at::Tensor& code, double offset, int64_t blocksize,
                       int64_t blocksize2, int64_t N, int64_t K) {
  const Nf4Weight w =
      make_weight(packed, absmax, absmax2, code2, code, offset, blocksize, blocksize2, N, K, "nf4_dequant");
  return dequant_all(w, packed.options());
}

at::Tensor nf4_linear_fwd(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const c10::optional<at::Tensor>& absmax2, const c10::optional<at::Tensor>& code2,
                          const at::Tensor& code, double offset, int64_t blocksize, int64_t blocksize2, int64_t N,
                          const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "nf4_linear_fwd: x must be a contiguous fp32 [M, K] CPU tensor");
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the at:: calls below are the kernel, not a graph
  const int64_t M = x.size(0), K = x.size(1);
  const Nf4Weight w = make_weight(packed, absmax, absmax2, code2, code, offset, blocksize, blocksize2, N, K,
                                  "nf4_linear_fwd");
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N &&
                    bias->device().is_cpu(),
                "nf4_linear_fwd: bias must be a contiguous fp32 [N] CPU tensor");
    b = bias->const_data_ptr<float>();
  }
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (M <= kFusedMaxRows || K == 0) {
    fused_forward(w, x.const_data_ptr<float>(), M, b, y.data_ptr<float>());
  } else {
    for (int64_t m0 = 0; m0 < M; m0 += kTiledMaxRows) {  // chunks of up to kTiledMaxRows rows
      const int64_t mr = std::min(kTiledMaxRows, M - m0);
      at::Tensor y_rows = y.narrow(0, m0, mr);
      tiled_forward(w, x.narrow(0, m0, mr), b, y_rows);
    }
  }
  return y;
}

at::Tensor nf4_linear_bwd(const at::Tensor& grad_y, const at::Tensor& packed, const at::Tensor& absmax,
                          const c10::optional<at::Tensor>& absmax2, const c10::optional<at::Tensor>& code2,
                          const at::Tensor& code, double offset, int64_t blocksize, int64_t blocksize2, int64_t N,
                          int64_t K) {
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(1) == N && grad_y.scalar_type() == at::kFloat &&
                  grad_y.device().is_cpu(),
              "nf4_linear_bwd: grad_y must be an fp32 [M, N] CPU tensor");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Nf4Weight w = make_weight(packed, absmax, absmax2, code2, code, offset, blocksize, blocksize2, N, K,
                                  "nf4_linear_bwd");
  return at::mm(grad_y, dequant_all(w, grad_y.options()));
}

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_FRAGMENT(rlhf_kernels, m) {
  m.def("nf4_dequant(Tensor packed, Tensor absmax, Tensor? absmax2, Tensor? code2, Tensor code, float offset, "
        "int blocksize, int blocksize2, int N, int K) -> Tensor");
  m.def("nf4_linear_fwd(Tensor x, Tensor packed, Tensor absmax, Tensor? absmax2, Tensor? code2, Tensor code, "
        "float offset, int blocksize, int blocksize2, int N, Tensor? bias) -> Tensor");
  m.def("nf4_linear_bwd(Tensor grad_y, Tensor packed, Tensor absmax, Tensor? absmax2, Tensor? code2, Tensor code, "
        "float offset, int blocksize, int blocksize2, int N, int K) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("nf4_dequant", &rlhf::nf4_dequant);
  m.impl("nf4_linear_fwd", &rlhf::nf4_linear_fwd);
  m.impl("nf4_linear_bwd", &rlhf::nf4_linear_bwd);
}
