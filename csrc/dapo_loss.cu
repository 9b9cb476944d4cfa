// The DAPO token-level clipped loss, forward (loss and metric sums) and backward (d loss / d logp).
//
// Per valid token (mask != 0), with A the advantage and r = exp(clamp(logp - old_logp, -20, 20)):
//   pessimistic = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))
//   loss_t      = A < 0 ? min(pessimistic, -A clip_c) : pessimistic, times the importance weight if given
//   loss        = sum_t loss_t / max(global_tokens, 1)
// Sums: tokens, clip-high (A > 0, r > 1 + eps_high), clip-low (A < 0, r < 1 - eps_low),
// dual-clip (A < 0, r > clip_c), KL k1 (-log r) and k3 (r - 1 - log r); and the largest ratio.
// Gradients at ties (max / min of equal values) are split in half, as torch's autograd does, so the
// kernel and the pure-torch reference agree everywhere. Reductions are two-stage, each in a fixed order:
// the result does not depend on scheduling.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

namespace mdapo {
namespace {

constexpr int kThreads = 256;
constexpr int kSums = 7;  // loss, tokens, clip_high, clip_low, dual_clip, kl_k1, kl_k3
constexpr float kLogRatioClamp = 20.f;

// The clip range [lo, hi] = [1 - clip_low, 1 + clip_high], each bound worked out in double and rounded once to
// float, as the reference's float32 clamp rounds its Python-float bounds (1.f - 0.111f is 1 ulp off).
struct LossParams {
  float lo, hi, clip_c;
};

inline LossParams loss_params(double clip_low, double clip_high, double clip_c) {
  return LossParams{static_cast<float>(1.0 - clip_low), static_cast<float>(1.0 + clip_high),
                    static_cast<float>(clip_c)};
}

struct TokenResult {
  float loss, dloss_dlogp, ratio, log_ratio;
  bool valid, clip_high, clip_low, dual_clip;
};

__device__ __forceinline__ TokenResult token_loss(float logp, float old_logp, float advantage, float mask,
                                                  float weight, LossParams p) {
  TokenResult r{};
  r.valid = mask != 0.f;
  const float raw = r.valid ? logp - old_logp : 0.f;
  const float a = r.valid ? advantage : 0.f;
  const bool inside_clamp = raw >= -kLogRatioClamp && raw <= kLogRatioClamp;
  // fminf / fmaxf return the other operand for a NaN; torch's clamp keeps it, and so does this.
  r.log_ratio = isnan(raw) ? raw : fminf(fmaxf(raw, -kLogRatioClamp), kLogRatioClamp);
  r.ratio = expf(r.log_ratio);
  const float lo = p.lo, hi = p.hi;
  const float unclipped = -a * r.ratio;
  const float clipped = -a * fminf(fmaxf(r.ratio, lo), hi);
  const float d_unclipped = -a;
  const float d_clipped = (r.ratio >= lo && r.ratio <= hi) ? -a : 0.f;
  const float pessimistic = fmaxf(unclipped, clipped);
  const float d_pessimistic = unclipped > clipped ? d_unclipped
                              : unclipped < clipped ? d_clipped
                                                    : 0.5f * (d_unclipped + d_clipped);
  float loss = pessimistic, d_loss = d_pessimistic;
  if (a < 0.f) {
    const float dual = -a * p.clip_c;
    loss = fminf(pessimistic, dual);
    d_loss = pessimistic < dual ? d_pessimistic : pessimistic > dual ? 0.f : 0.5f * d_pessimistic;
  }
  r.loss = (isnan(r.log_ratio) ? r.log_ratio : loss) * weight;  // a NaN log-prob makes the loss NaN
  r.dloss_dlogp = (r.valid && inside_clamp) ? d_loss * r.ratio * weight : 0.f;
  r.clip_high = a > 0.f && r.ratio > hi;
  r.clip_low = a < 0.f && r.ratio < lo;
  r.dual_clip = a < 0.f && r.ratio > p.clip_c;
  return r;
}

// The larger of two floats, NaN if either is (torch's max; fmaxf would drop the NaN).
__device__ __forceinline__ float max_keep_nan(float a, float b) { return isnan(a) || isnan(b) ? NAN : fmaxf(a, b); }

__device__ __forceinline__ float weight_at(const float* weight, int64_t i) { return weight ? weight[i] : 1.f; }

// The block's threads' sums and largest ratios combined in a fixed tree (the same order whatever the scheduling);
// the results in shared[k][0] and shared_max[0], for every thread to read after the last barrier.
__device__ __forceinline__ void reduce_in_block(const double (&sums)[kSums], float ratio_max,
                                                double (&shared)[kSums][kThreads], float (&shared_max)[kThreads]) {
#pragma unroll
  for (int k = 0; k < kSums; ++k) {
    shared[k][threadIdx.x] = sums[k];
  }
  shared_max[threadIdx.x] = ratio_max;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width >>= 1) {
    if (threadIdx.x < width) {
#pragma unroll
      for (int k = 0; k < kSums; ++k) {
        shared[k][threadIdx.x] += shared[k][threadIdx.x + width];
      }
      shared_max[threadIdx.x] = max_keep_nan(shared_max[threadIdx.x], shared_max[threadIdx.x + width]);
    }
    __syncthreads();
  }
}

// Stage 1: each block writes its partial sums (fp64) and its largest ratio.
__global__ void dapo_loss_partial_kernel(const float* __restrict__ logp, const float* __restrict__ old_logp,
                                         const float* __restrict__ advantages, const float* __restrict__ mask,
                                         const float* __restrict__ weight, int64_t n, LossParams params,
                                         double* __restrict__ partial, float* __restrict__ partial_max) {
  double sums[kSums] = {0, 0, 0, 0, 0, 0, 0};
  float ratio_max = 0.f;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const TokenResult t = token_loss(logp[i], old_logp[i], advantages[i], mask[i], weight_at(weight, i), params);
    if (!t.valid) {
      continue;
    }
    sums[0] += t.loss;
    sums[1] += 1.0;
    sums[2] += t.clip_high;
    sums[3] += t.clip_low;
    sums[4] += t.dual_clip;
    sums[5] += -t.log_ratio;
    sums[6] += (t.ratio - 1.f) - t.log_ratio;
    ratio_max = max_keep_nan(ratio_max, t.ratio);
  }
  __shared__ double shared[kSums][kThreads];
  __shared__ float shared_max[kThreads];
  reduce_in_block(sums, ratio_max, shared, shared_max);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < kSums; ++k) {
      partial[blockIdx.x * kSums + k] = shared[k][0];
    }
    partial_max[blockIdx.x] = shared_max[0];
  }
}

// Stage 2: one block of kThreads adds the blocks' partials: thread t those of blocks t, t + kThreads, ... in
// that order, then the threads' sums in the fixed tree of stage 1 (a single thread walking up to 1024 partials
// one after another took longer than stage 1 over a million tokens). out = [loss, tokens, clip_high, clip_low,
// dual_clip, kl_k1, kl_k3, ratio_max], the loss already divided by max(global_tokens, 1).
__global__ void __launch_bounds__(kThreads) dapo_loss_final_kernel(const double* __restrict__ partial,
                                                                   const float* __restrict__ partial_max, int blocks,
                                                                   const float* __restrict__ global_tokens,
                                                                   float* __restrict__ out) {
  double sums[kSums] = {0, 0, 0, 0, 0, 0, 0};
  float ratio_max = 0.f;
  for (int b = threadIdx.x; b < blocks; b += kThreads) {
#pragma unroll
    for (int k = 0; k < kSums; ++k) {
      sums[k] += partial[b * kSums + k];
    }
    ratio_max = max_keep_nan(ratio_max, partial_max[b]);
  }
  __shared__ double shared[kSums][kThreads];
  __shared__ float shared_max[kThreads];
  reduce_in_block(sums, ratio_max, shared, shared_max);
  if (threadIdx.x == 0) {
    const double count = static_cast<double>(global_tokens[0]);
    const double denominator = isnan(count) ? count : fmax(count, 1.0);  // torch's clamp keeps a NaN
    out[0] = static_cast<float>(shared[0][0] / denominator);
    for (int k = 1; k < kSums; ++k) {
      out[k] = static_cast<float>(shared[k][0]);
    }
    out[kSums] = shared_max[0];
  }
}

__global__ void dapo_loss_backward_kernel(const float* __restrict__ grad_out, const float* __restrict__ logp,
                                          const float* __restrict__ old_logp, const float* __restrict__ advantages,
                                          const float* __restrict__ mask, const float* __restrict__ weight, int64_t n,
                                          LossParams params, const float* __restrict__ global_tokens,
                                          float* __restrict__ grad_logp) {
  // Rounded as the reference's division is (-prec-div=false would make `/` approximate).
  const float scale = __fdiv_rn(grad_out[0], max_keep_nan(global_tokens[0], 1.f));
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const TokenResult t = token_loss(logp[i], old_logp[i], advantages[i], mask[i], weight_at(weight, i), params);
    grad_logp[i] = t.dloss_dlogp * scale;
  }
}

torch::Tensor flat_float(const torch::Tensor& t, int64_t n, const char* name, const torch::Device& device) {
  TORCH_CHECK(t.numel() == n, "megatron_dapo._C dapo_loss: ", name, " has ", t.numel(), " elements, expected ", n);
  TORCH_CHECK(t.device() == device, "megatron_dapo._C dapo_loss: ", name, " is not on ", device);
  return t.reshape({n}).to(torch::kFloat).contiguous();
}

// The per-token inputs flattened to contiguous float32 on logp's device, checked by name.
struct LossInputs {
  int64_t n;
  torch::Tensor logp, old_logp, advantages, mask, weight, global_tokens;

  LossInputs(const torch::Tensor& lp, const torch::Tensor& old, const torch::Tensor& adv, const torch::Tensor& msk,
             const c10::optional<torch::Tensor>& w, const torch::Tensor& tokens) : n(lp.numel()) {
    TORCH_CHECK(lp.is_cuda(), "megatron_dapo._C dapo_loss: logp must be a CUDA tensor");
    const auto device = lp.device();
    logp = flat_float(lp, n, "logp", device);
    old_logp = flat_float(old, n, "old_logp", device);
    advantages = flat_float(adv, n, "advantages", device);
    mask = flat_float(msk, n, "mask", device);
    global_tokens = flat_float(tokens, 1, "global_tokens", device);
    if (w.has_value()) {
      weight = flat_float(*w, n, "weight", device);
    }
  }

  const float* weight_ptr() const { return weight.defined() ? weight.data_ptr<float>() : nullptr; }
};

int grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 1024)));
}

}  // namespace

torch::Tensor dapo_loss_forward(const torch::Tensor& logp, const torch::Tensor& old_logp,
                                const torch::Tensor& advantages, const torch::Tensor& mask,
                                const c10::optional<torch::Tensor>& weight, double clip_low, double clip_high,
                                double clip_c, const torch::Tensor& global_tokens) {
  const LossInputs in(logp, old_logp, advantages, mask, weight, global_tokens);  // checks logp is on CUDA
  const c10::cuda::CUDAGuard guard(logp.device());
  const int64_t n = in.n;
  const auto& lp = in.logp;
  const int blocks = grid_for(n);
  auto partial = torch::empty({blocks, kSums}, lp.options().dtype(torch::kDouble));
  auto partial_max = torch::empty({blocks}, lp.options());
  auto out = torch::empty({kSums + 1}, lp.options());
  const LossParams params = loss_params(clip_low, clip_high, clip_c);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dapo_loss_partial_kernel<<<blocks, kThreads, 0, stream>>>(
      lp.data_ptr<float>(), in.old_logp.data_ptr<float>(), in.advantages.data_ptr<float>(),
      in.mask.data_ptr<float>(), in.weight_ptr(), n, params, partial.data_ptr<double>(),
      partial_max.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  dapo_loss_final_kernel<<<1, kThreads, 0, stream>>>(partial.data_ptr<double>(), partial_max.data_ptr<float>(), blocks,
                                               in.global_tokens.data_ptr<float>(), out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

torch::Tensor dapo_loss_backward(const torch::Tensor& grad_loss, const torch::Tensor& logp,
                                 const torch::Tensor& old_logp, const torch::Tensor& advantages,
                                 const torch::Tensor& mask, const c10::optional<torch::Tensor>& weight,
                                 double clip_low, double clip_high, double clip_c,
                                 const torch::Tensor& global_tokens) {
  const LossInputs in(logp, old_logp, advantages, mask, weight, global_tokens);  // checks logp is on CUDA
  const c10::cuda::CUDAGuard guard(logp.device());
  const int64_t n = in.n;
  const auto& lp = in.logp;
  const auto g = flat_float(grad_loss, 1, "grad_loss", logp.device());
  auto grad = torch::empty({n}, lp.options());
  if (n > 0) {
    const LossParams params = loss_params(clip_low, clip_high, clip_c);
    dapo_loss_backward_kernel<<<grid_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        g.data_ptr<float>(), lp.data_ptr<float>(), in.old_logp.data_ptr<float>(), in.advantages.data_ptr<float>(),
        in.mask.data_ptr<float>(), in.weight_ptr(), n, params, in.global_tokens.data_ptr<float>(),
        grad.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return grad.view(logp.sizes());
}

}  // namespace mdapo
