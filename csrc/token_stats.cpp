// kernels.token_stats on CPU (and the vocabulary math of kernels.linear_logprobs /
// kernels.linear_token_stats): one read of each logits row gives logp, entropy and KL(p || q); the
// backward gives the gradient of any combination of them. The row math lives in vocab_rows.h.
#include <torch/library.h>

#include "vocab_rows.h"

namespace rlhf {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_stats_fwd(
    const at::Tensor& x3, const std::optional<at::Tensor>& z3, const std::optional<at::Tensor>& labels,
    double inv_temp, int64_t ignore_index, bool entropy) {
  return vocab::stats_fwd(x3, z3, labels, inv_temp, ignore_index, entropy, "token_stats_fwd");
}

at::Tensor token_stats_bwd(const at::Tensor& x3, const std::optional<at::Tensor>& z3,
                           const std::optional<at::Tensor>& labels, const at::Tensor& stats,
                           const std::optional<at::Tensor>& stats_ref, const std::optional<at::Tensor>& ent,
                           const std::optional<at::Tensor>& kl, const std::optional<at::Tensor>& grad_logp,
                           const std::optional<at::Tensor>& grad_ent, const std::optional<at::Tensor>& grad_kl,
                           double inv_temp, int64_t ignore_index) {
  return vocab::stats_bwd(x3, z3, labels, stats, stats_ref, ent, kl, grad_logp, grad_ent, grad_kl, inv_temp,
                          ignore_index, "token_stats_bwd");
}

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_FRAGMENT(rlhf_kernels, m) {
  m.def(
      "token_stats_fwd(Tensor x3, Tensor? z3, Tensor? labels, float inv_temp, int ignore_index, bool entropy) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "token_stats_bwd(Tensor x3, Tensor? z3, Tensor? labels, Tensor stats, Tensor? stats_ref, Tensor? ent, "
      "Tensor? kl, Tensor? grad_logp, Tensor? grad_ent, Tensor? grad_kl, float inv_temp, int ignore_index) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("token_stats_fwd", &rlhf::token_stats_fwd);
  m.impl("token_stats_bwd", &rlhf::token_stats_bwd);
}
