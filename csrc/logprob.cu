// Log-prob + entropy over this rank's slice of the vocabulary: per-token statistics in one read of
// the logits (forward), and the logits gradient in one read + one write (backward, in place allowed).
//
// With z = logits / temperature over the local columns [0, valid):
//   forward  stats[t] = (m, sum exp(z - m), sum exp(z - m) * (z - m), z[target] or 0 when another rank owns it)
//   backward grad[t, j] = (g_logp * (1[j = target] - p_j) + g_entropy * p_j * (E[z] - z_j)) / temperature
//            with d_j = z_j - top, p_j = exp(d_j - log_total), E[z] - z_j = shifted - d_j (top, log_total and
//            shifted = E[z - top] from the combined statistics: never lse or E[z] themselves, which float32 rounds
//            at the logits' size); columns >= valid (vocabulary padding) get 0.
// One block per token row; the row is read in 16-byte packs when its address allows, several per thread
// at a time.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "common.cuh"

namespace mdapo {
namespace {

constexpr int kMaxThreads = 512;
constexpr int kUnroll = 4;  // packs loaded per thread before any is used: 64 bytes in flight per thread

int threads_for(int64_t columns) { return columns >= 16384 ? kMaxThreads : (columns >= 2048 ? 256 : 128); }

// Folds VEC values into this thread's online-softmax state (m, s, w) (common.cuh).
template <typename T, int VEC>
__device__ __forceinline__ void accumulate(const Pack<T, VEC>& pack, float inv_temperature, float& m, float& s,
                                           float& w) {
  float z[VEC];
  float top = -CUDART_INF_F;
  bool nan = false;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    z[k] = static_cast<float>(pack.v[k]) * inv_temperature;
    top = fmaxf(top, z[k]);  // skips a NaN: `nan` keeps it
    nan |= isnan(z[k]);
  }
  if (top > m) {
    rebase_softmax(m, s, w, top);
  }
  if (nan) {  // a NaN logit makes the row's statistics NaN, as torch's max and sum do; NaN * 0 stays NaN after
    s = CUDART_NAN_F;
    w = CUDART_NAN_F;
  }
  if (m == -CUDART_INF_F) {
    return;  // only -inf (and NaN) so far: nothing to add
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const float e = __expf(z[k] - m);
    s += e;
    w += e == 0.f ? 0.f : e * (z[k] - m);  // a -inf logit (a token that cannot be drawn) adds 0, not 0 * -inf
  }
}

// Memory-bound: each thread keeps kUnroll 16-byte loads in flight. An estimate, not a measurement: one load
// per thread at 1024-2048 resident threads is 16-32 KB in flight per SM, while covering ~0.7 us of latency at
// 4.3 TB/s over 132 SMs takes ~23 KB per SM; four loads leave a margin. ptxas (nvcc 13.0, sm_90) gives the
// bf16 kernels 40 (stats) and 64 (grad) registers, no spills: 3 and 2 blocks of 512 threads per SM.
template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads) logprob_stats_kernel(
    const T* __restrict__ logits, int64_t row_stride, const int64_t* __restrict__ targets, float inv_temperature,
    int64_t valid, float* __restrict__ stats) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * row_stride;
  float m = -CUDART_INF_F, s = 0.f, w = 0.f;

  const int64_t packs = valid / VEC;
  const int64_t stride = blockDim.x;
  const Pack<T, VEC>* xp = reinterpret_cast<const Pack<T, VEC>*>(x);
  int64_t i = threadIdx.x;
  for (; i + (kUnroll - 1) * stride < packs; i += kUnroll * stride) {
    Pack<T, VEC> loaded[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      loaded[u] = xp[i + u * stride];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      accumulate<T, VEC>(loaded[u], inv_temperature, m, s, w);
    }
  }
  for (; i < packs; i += stride) {
    accumulate<T, VEC>(xp[i], inv_temperature, m, s, w);
  }
  for (int64_t j = packs * VEC + threadIdx.x; j < valid; j += stride) {
    Pack<T, 1> one;
    one.v[0] = x[j];
    accumulate<T, 1>(one, inv_temperature, m, s, w);
  }

  block_merge_softmax(m, s, w);
  if (threadIdx.x == 0) {
    const int64_t target = targets[row];
    const float target_z = (target >= 0 && target < valid) ? static_cast<float>(x[target]) * inv_temperature : 0.f;
    float* out = stats + row * 4;
    out[0] = m;
    out[1] = s;
    out[2] = w;
    out[3] = target_z;
  }
}

// The gradient of VEC consecutive columns starting at column j0.
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> grad_pack(const Pack<T, VEC>& pack, int64_t j0, int64_t valid,
                                                  int64_t target, float row_top, float row_log_total,
                                                  float row_shifted, float g_lp, float g_h, float inv_temperature) {
  Pack<T, VEC> result;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const int64_t j = j0 + k;
    float g = 0.f;
    if (j < valid) {
      const float d = static_cast<float>(pack.v[k]) * inv_temperature - row_top;
      const float p = __expf(d - row_log_total);
      g = (p == 0.f ? 0.f : p * (g_h * (row_shifted - d) - g_lp)) + (j == target ? g_lp : 0.f);  // -inf: 0, not 0*inf
    }
    result.v[k] = static_cast<T>(g * inv_temperature);
  }
  return result;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads) logprob_grad_kernel(
    const T* logits, int64_t row_stride, const int64_t* __restrict__ targets, const float* __restrict__ top,
    const float* __restrict__ log_total, const float* __restrict__ shifted, const float* __restrict__ grad_logp,
    const float* __restrict__ grad_entropy, float inv_temperature, int64_t valid, int64_t columns, T* grad,
    int64_t grad_row_stride) {
  // `grad` may be `logits` itself (in place): a thread writes only the packs it has read itself.
  const int64_t row = blockIdx.x;
  const T* x = logits + row * row_stride;
  T* out = grad + row * grad_row_stride;
  const float row_top = top[row];
  const float row_log_total = log_total[row];
  const float row_shifted = shifted[row];
  const float g_lp = grad_logp[row];
  const float g_h = grad_entropy[row];
  const int64_t target = targets[row];

  const int64_t packs = columns / VEC;
  const int64_t stride = blockDim.x;
  const Pack<T, VEC>* xp = reinterpret_cast<const Pack<T, VEC>*>(x);
  Pack<T, VEC>* op = reinterpret_cast<Pack<T, VEC>*>(out);
  int64_t i = threadIdx.x;
  for (; i + (kUnroll - 1) * stride < packs; i += kUnroll * stride) {
    Pack<T, VEC> loaded[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      loaded[u] = xp[i + u * stride];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      op[i + u * stride] = grad_pack<T, VEC>(loaded[u], (i + u * stride) * VEC, valid, target, row_top,
                                             row_log_total, row_shifted, g_lp, g_h, inv_temperature);
    }
  }
  for (; i < packs; i += stride) {
    op[i] = grad_pack<T, VEC>(xp[i], i * VEC, valid, target, row_top, row_log_total, row_shifted, g_lp, g_h,
                              inv_temperature);
  }
  for (int64_t j = packs * VEC + threadIdx.x; j < columns; j += stride) {
    Pack<T, 1> one;
    one.v[0] = x[j];
    out[j] = grad_pack<T, 1>(one, j, valid, target, row_top, row_log_total, row_shifted, g_lp, g_h,
                             inv_temperature).v[0];
  }
}

void check_logits(const torch::Tensor& logits, const torch::Tensor& targets) {
  TORCH_CHECK(logits.is_cuda(), "megatron_dapo._C: logits must be a CUDA tensor");
  TORCH_CHECK(logits.dim() == 2, "megatron_dapo._C: logits must be [tokens, vocab_slice], got ", logits.sizes());
  TORCH_CHECK(logits.stride(1) == 1, "megatron_dapo._C: logits rows must be contiguous");
  // The kernels compute in float32: float64 logits (which the reference keeps in float64) are refused, not rounded.
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat || dtype == torch::kBFloat16 || dtype == torch::kHalf,
              "megatron_dapo._C: logits must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0) && targets.scalar_type() == torch::kLong,
              "megatron_dapo._C: targets must be int64 [tokens]");
  TORCH_CHECK(targets.device() == logits.device(), "megatron_dapo._C: targets must be on the logits' device");
}

template <typename T>
bool packs_fit(const T* base, int64_t row_stride, int vec) {
  return reinterpret_cast<uintptr_t>(base) % (sizeof(T) * vec) == 0 && row_stride % vec == 0;
}

}  // namespace

torch::Tensor logprob_stats(const torch::Tensor& logits, const torch::Tensor& targets, double temperature,
                            int64_t valid) {
  check_logits(logits, targets);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto targets_c = targets.contiguous();
  const int64_t rows = logits.size(0);
  auto stats = torch::empty({rows, 4}, logits.options().dtype(torch::kFloat));
  if (rows == 0) {
    return stats;
  }
  valid = std::max<int64_t>(0, std::min<int64_t>(valid, logits.size(1)));
  const float inv_temperature = static_cast<float>(1.0 / temperature);
  const int threads = threads_for(valid);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprob_stats", [&] {
    const auto* base = logits.data_ptr<scalar_t>();
    constexpr int VEC = 16 / sizeof(scalar_t);
    if (packs_fit(base, logits.stride(0), VEC)) {
      logprob_stats_kernel<scalar_t, VEC><<<rows, threads, 0, stream>>>(
          base, logits.stride(0), targets_c.data_ptr<int64_t>(), inv_temperature, valid, stats.data_ptr<float>());
    } else {
      logprob_stats_kernel<scalar_t, 1><<<rows, threads, 0, stream>>>(
          base, logits.stride(0), targets_c.data_ptr<int64_t>(), inv_temperature, valid, stats.data_ptr<float>());
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return stats;
}

void logprob_grad_into(const torch::Tensor& logits, const torch::Tensor& targets, const torch::Tensor& top,
                       const torch::Tensor& log_total, const torch::Tensor& shifted, const torch::Tensor& grad_logp,
                       const torch::Tensor& grad_entropy, double temperature, int64_t valid, torch::Tensor& grad) {
  check_logits(logits, targets);
  TORCH_CHECK(grad.sizes() == logits.sizes() && grad.scalar_type() == logits.scalar_type() && grad.stride(1) == 1,
              "megatron_dapo._C: grad must have the logits' shape and dtype, rows contiguous");
  TORCH_CHECK(grad.device() == logits.device(), "megatron_dapo._C: grad must be on the logits' device");
  // Each block writes its rows of grad after reading the same rows of logits: rows of grad that share memory (an
  // expanded tensor), or a grad that overlaps the logits other than exactly (in place), would race.
  at::assert_no_internal_overlap(grad);
  at::assert_no_partial_overlap(grad, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0);
  if (rows == 0) {
    return;
  }
  auto as_rows = [&](const torch::Tensor& t, const char* name) {
    TORCH_CHECK(t.numel() == rows, "megatron_dapo._C: ", name, " must have one value per token");
    TORCH_CHECK(t.device() == logits.device(), "megatron_dapo._C: ", name, " must be on the logits' device");
    return t.to(torch::kFloat).contiguous();
  };
  const auto top_c = as_rows(top, "top");
  const auto log_total_c = as_rows(log_total, "log_total");
  const auto shifted_c = as_rows(shifted, "shifted");
  const auto glp_c = as_rows(grad_logp, "grad_logp");
  const auto gh_c = as_rows(grad_entropy, "grad_entropy");
  const auto targets_c = targets.contiguous();
  valid = std::max<int64_t>(0, std::min<int64_t>(valid, logits.size(1)));
  const float inv_temperature = static_cast<float>(1.0 / temperature);
  const int threads = threads_for(logits.size(1));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprob_grad", [&] {
    const auto* base = logits.data_ptr<scalar_t>();
    auto* out = grad.data_ptr<scalar_t>();
    constexpr int VEC = 16 / sizeof(scalar_t);
    if (packs_fit(base, logits.stride(0), VEC) && packs_fit(static_cast<const scalar_t*>(out), grad.stride(0), VEC)) {
      logprob_grad_kernel<scalar_t, VEC><<<rows, threads, 0, stream>>>(
          base, logits.stride(0), targets_c.data_ptr<int64_t>(), top_c.data_ptr<float>(),
          log_total_c.data_ptr<float>(), shifted_c.data_ptr<float>(), glp_c.data_ptr<float>(), gh_c.data_ptr<float>(),
          inv_temperature, valid, logits.size(1), out, grad.stride(0));
    } else {
      logprob_grad_kernel<scalar_t, 1><<<rows, threads, 0, stream>>>(
          base, logits.stride(0), targets_c.data_ptr<int64_t>(), top_c.data_ptr<float>(),
          log_total_c.data_ptr<float>(), shifted_c.data_ptr<float>(), glp_c.data_ptr<float>(), gh_c.data_ptr<float>(),
          inv_temperature, valid, logits.size(1), out, grad.stride(0));
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mdapo
