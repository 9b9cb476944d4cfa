// Python bindings of the fused kernels: the module megatron_dapo._C.
// The package calls these only through the custom ops in megatron_dapo/ops/.
#include <torch/extension.h>

namespace mdapo {
torch::Tensor logprob_stats(const torch::Tensor& logits, const torch::Tensor& targets, double temperature,
                            int64_t valid);
void logprob_grad_into(const torch::Tensor& logits, const torch::Tensor& targets, const torch::Tensor& top,
                       const torch::Tensor& log_total, const torch::Tensor& shifted, const torch::Tensor& grad_logp,
                       const torch::Tensor& grad_entropy, double temperature, int64_t valid, torch::Tensor& grad);
torch::Tensor dapo_loss_forward(const torch::Tensor& logp, const torch::Tensor& old_logp,
                                const torch::Tensor& advantages, const torch::Tensor& mask,
                                const c10::optional<torch::Tensor>& weight, double clip_low, double clip_high,
                                double clip_c, const torch::Tensor& global_tokens);
torch::Tensor dapo_loss_backward(const torch::Tensor& grad_loss, const torch::Tensor& logp,
                                 const torch::Tensor& old_logp, const torch::Tensor& advantages,
                                 const torch::Tensor& mask, const c10::optional<torch::Tensor>& weight,
                                 double clip_low, double clip_high, double clip_c,
                                 const torch::Tensor& global_tokens);
}  // namespace mdapo

// The GPU architectures the build compiled for, as setup.py names them (sm80_sm90_ptx90).
#ifndef MDAPO_CUDA_ARCHS
#define MDAPO_CUDA_ARCHS unknown
#endif
#define MDAPO_TEXT(x) #x
#define MDAPO_TEXT_OF(x) MDAPO_TEXT(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron-dapo fused CUDA kernels (log-prob + entropy, DAPO loss)";
  // What the Python side reads the statistics as, and hands the backward (3: top, log_total, shifted): a build of
  // other sources is refused by megatron_dapo.ops.extension.
  m.attr("STATS_LAYOUT") = 3;
  // What megatron_dapo.ops.extension checks a GPU against: on one the build holds no code for, the references run.
  m.attr("CUDA_ARCHS") = MDAPO_TEXT_OF(MDAPO_CUDA_ARCHS);
  m.def("logprob_stats", &mdapo::logprob_stats,
        "per-token (max, sum exp(z - m), sum exp(z - m) * (z - m), target z) of a vocab slice",
        pybind11::arg("logits"), pybind11::arg("targets"), pybind11::arg("temperature"), pybind11::arg("valid"));
  m.def("logprob_grad_into", &mdapo::logprob_grad_into, "logits gradient written into `grad` (may be the logits)",
        pybind11::arg("logits"), pybind11::arg("targets"), pybind11::arg("top"), pybind11::arg("log_total"),
        pybind11::arg("shifted"),
        pybind11::arg("grad_logp"), pybind11::arg("grad_entropy"), pybind11::arg("temperature"),
        pybind11::arg("valid"), pybind11::arg("grad"));
  m.def("dapo_loss_forward", &mdapo::dapo_loss_forward,
        "[loss, tokens, clip_high, clip_low, dual_clip, kl_k1, kl_k3, ratio_max]");
  m.def("dapo_loss_backward", &mdapo::dapo_loss_backward, "d loss / d logp");
}
