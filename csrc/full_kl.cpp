// kernels.full_kl on CPU: exact KL(softmax(x / T) || softmax(z / T)) per row in one read of each
// tensor, and its gradient w.r.t. x. The row math lives in vocab_rows.h (shared with token_stats).
#include <torch/library.h>

#include "vocab_rows.h"

namespace rlhf {
namespace {

// -> (kl [N], stats [N, 2], stats_ref [N, 2]), fp32; stats = (max, log sum exp((x - max) / T)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> full_kl_fwd(const at::Tensor& x3, const at::Tensor& z3,
                                                           double inv_temp) {
  auto [logp, ent, kl, stats, stats_ref] =
      vocab::stats_fwd(x3, z3, std::nullopt, inv_temp, -100, false, "full_kl_fwd");
  return {kl, stats, stats_ref};
}

// grad_x_v = g p_v (log p_v - log q_v - KL) / T -> [N, V] contiguous in x's dtype.
at::Tensor full_kl_bwd(const at::Tensor& x3, const at::Tensor& z3, const at::Tensor& stats,
                       const at::Tensor& stats_ref, const at::Tensor& kl, const at::Tensor& grad_kl, double inv_temp) {
  return vocab::stats_bwd(x3, z3, std::nullopt, stats, stats_ref, std::nullopt, kl, std::nullopt, std::nullopt, grad_kl,
                          inv_temp, -100, "full_kl_bwd");
}

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_FRAGMENT(rlhf_kernels, m) {
  m.def("full_kl_fwd(Tensor x3, Tensor z3, float inv_temp) -> (Tensor, Tensor, Tensor)");
  m.def(
      "full_kl_bwd(Tensor x3, Tensor z3, Tensor stats, Tensor stats_ref, Tensor kl, Tensor grad_kl, float inv_temp) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("full_kl_fwd", &rlhf::full_kl_fwd);
  m.impl("full_kl_bwd", &rlhf::full_kl_bwd);
}
