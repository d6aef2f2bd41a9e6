// kernels.gae on CUDA: the masked GAE recurrence of kernels/gae.py as a block-wide associative scan.
//
// Each position t is an affine map of the backward state x = (A, V) (advantage and value at the first
// valid position at or after t): valid  A' = c A + gamma V + (r - v), V' = v;  masked  identity.
// A map is 5 floats (p, q, s, a, b) for x' = [[p, q], [0, s]] x + (a, b); composing two is associative.
//
// One block per row walks the row backwards in tiles of blockDim * kItems positions. Within a tile,
// thread j owns kItems consecutive positions (in reverse time): it composes their maps, the block
// scans the per-thread maps (warp shuffles, then one warp over the warp totals), and each thread
// replays its positions from the state handed over by the threads after it in time. So a row of T
// positions costs T / (blockDim * kItems) dependent tile steps, not T serial steps: no row
// serialises a GPU on one thread. Math fp32 whatever the input dtype; outputs fp32 contiguous.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace rlhf {
namespace {

constexpr int kItems = 8;        // positions per thread per tile
constexpr int kMaxThreads = 256;  // 8 warps: a 2048-position tile

struct Map {
  float p, q, s, a, b;
};

__device__ __forceinline__ Map identity_map() { return {1.f, 0.f, 1.f, 0.f, 0.f}; }

// `second` after `first` (first is later in time, so it acts first going backwards).
__device__ __forceinline__ Map compose(const Map& f, const Map& g) {
  return {g.p * f.p, g.p * f.q + g.q * f.s, g.s * f.s, g.p * f.a + g.q * f.b + g.a, g.s * f.b + g.b};
}

__device__ __forceinline__ Map shfl_up(const Map& m, int delta) {
  constexpr unsigned kAll = 0xffffffffu;
  return {__shfl_up_sync(kAll, m.p, delta), __shfl_up_sync(kAll, m.q, delta), __shfl_up_sync(kAll, m.s, delta),
          __shfl_up_sync(kAll, m.a, delta), __shfl_up_sync(kAll, m.b, delta)};
}

// Inclusive scan over the 32 lanes of a warp, in lane order.
__device__ __forceinline__ Map warp_scan(Map m, int lane) {
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const Map other = shfl_up(m, d);
    if (lane >= d) m = compose(other, m);
  }
  return m;
}

template <typename T>
__global__ void gae_kernel(const T* __restrict__ r, int64_t srb, int64_t srt, const T* __restrict__ v, int64_t svb,
                           int64_t svt, const uint8_t* __restrict__ m, int64_t smb, int64_t smt, int64_t T_len,
                           float gamma, float c, float* __restrict__ adv, float* __restrict__ ret) {
  __shared__ Map warp_total[kMaxThreads / 32];
  __shared__ Map tile_total;
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, n_warps = blockDim.x >> 5;
  const int64_t tile = static_cast<int64_t>(blockDim.x) * kItems;
  const T* r_row = r + row * srb;
  const T* v_row = v + row * svb;
  const uint8_t* m_row = m + row * smb;
  float* adv_row = adv + row * T_len;
  float* ret_row = ret + row * T_len;
  float carry_a = 0.f, carry_v = 0.f;  // state at the first valid position >= the tile's end

  for (int64_t t_hi = T_len; t_hi > 0; t_hi -= tile) {
    // thread `tid` owns times t_hi - 1 - tid * kItems - k, k = 0..kItems-1 (reverse time)
    const int64_t t0 = t_hi - 1 - static_cast<int64_t>(tid) * kItems;
    float rv[kItems], vv[kItems];
    bool valid[kItems];
    Map mine = identity_map();
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t t = t0 - k;
      valid[k] = t >= 0 && m_row[t * smt] != 0;
      rv[k] = valid[k] ? static_cast<float>(r_row[t * srt]) : 0.f;
      vv[k] = valid[k] ? static_cast<float>(v_row[t * svt]) : 0.f;
      const Map step = valid[k] ? Map{c, gamma, 0.f, rv[k] - vv[k], vv[k]} : identity_map();
      mine = compose(mine, step);
    }
    // block-wide inclusive scan of the per-thread maps, in thread order
    Map incl = warp_scan(mine, lane);
    if (lane == 31) warp_total[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      Map w = lane < n_warps ? warp_total[lane] : identity_map();
      w = warp_scan(w, lane);
      if (lane < n_warps) warp_total[lane] = w;  // now inclusive over warps
      if (lane == n_warps - 1) tile_total = w;
    }
    __syncthreads();
    // exclusive prefix of this thread = (warps before) then (lanes before in this warp)
    Map excl = shfl_up(incl, 1);
    if (lane == 0) excl = identity_map();
    if (warp > 0) excl = compose(warp_total[warp - 1], excl);
    // state handed to this thread = prefix applied to the carry; then replay the own positions
    float A = excl.p * carry_a + excl.q * carry_v + excl.a;
    float V = excl.s * carry_v + excl.b;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t t = t0 - k;
      if (t < 0) break;
      if (valid[k]) {
        A = c * A + gamma * V + (rv[k] - vv[k]);
        V = vv[k];
        adv_row[t] = A;
        ret_row[t] = A + vv[k];
      } else {
        adv_row[t] = 0.f;
        ret_row[t] = 0.f;
      }
    }
    const Map total = tile_total;
    const float next_a = total.p * carry_a + total.q * carry_v + total.a;
    carry_v = total.s * carry_v + total.b;
    carry_a = next_a;
    __syncthreads();  // warp_total / tile_total are rewritten by the next tile
  }
}

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
                                            double gamma_d, double lam_d) {
  TORCH_CHECK(rewards.dim() == 2 && values.sizes() == rewards.sizes() && mask.sizes() == rewards.sizes(),
              "gae: rewards, values and mask must all be [B, T]");
  TORCH_CHECK(rewards.scalar_type() == values.scalar_type(), "gae: rewards and values must share a dtype");
  TORCH_CHECK(mask.scalar_type() == at::kByte, "gae: mask must be uint8");
  TORCH_CHECK(rewards.is_cuda() && values.is_cuda() && mask.is_cuda(), "gae (cuda): tensors must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(rewards.device());
  const int64_t B = rewards.size(0), T = rewards.size(1);
  auto opts = rewards.options().dtype(at::kFloat);
  at::Tensor adv = at::empty({B, T}, opts), ret = at::empty({B, T}, opts);
  if (B == 0 || T == 0) return {adv, ret};
  TORCH_CHECK(B <= 2147483647LL, "gae (cuda): too many rows for one grid axis");
  // as many warps as the row needs, up to 8: short rows do not idle 256 threads
  const int64_t warps_needed = (T + 32 * kItems - 1) / (32 * kItems);
  const int threads = static_cast<int>(32 * std::min<int64_t>(warps_needed, kMaxThreads / 32));
  const float gamma = static_cast<float>(gamma_d), c = static_cast<float>(gamma_d * lam_d);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rewards.scalar_type(), "gae_cuda", [&] {
    gae_kernel<scalar_t><<<static_cast<unsigned>(B), threads, 0, stream>>>(
        rewards.const_data_ptr<scalar_t>(), rewards.stride(0), rewards.stride(1), values.const_data_ptr<scalar_t>(),
        values.stride(0), values.stride(1), mask.const_data_ptr<uint8_t>(), mask.stride(0), mask.stride(1), T, gamma, c,
        adv.data_ptr<float>(), ret.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {adv, ret};
}

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) { m.impl("gae", &rlhf::gae_cuda); }
