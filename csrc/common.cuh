// Shared helpers of the megatron-dapo CUDA kernels: vector loads and block reductions.
#pragma once

#include <cuda_runtime.h>
#include <math_constants.h>

namespace mdapo {

// N consecutive elements loaded or stored as one 16-byte (or smaller) transaction.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// The online-softmax state of a part of a row: (m, s, w) = (max, sum exp(z - m), sum exp(z - m) * (z - m)).
// w is taken about the max, so that the entropy log(s) - w / s keeps fp32's precision whatever the logits' size
// (a sum of exp(z - m) * z would be of the logits' size, and lose it in the subtraction).

// The state (m, s, w) about a new max `top` >= m. A part with nothing that can be drawn (s = 0, m = -inf) stays
// (top, 0, 0), not 0 * -inf; a NaN in s stays.
__device__ __forceinline__ void rebase_softmax(float& m, float& s, float& w, float top) {
  const float scale = __expf(m - top);
  s *= scale;
  w = s == 0.f ? 0.f : w * scale + (m - top) * s;  // scaled first: (m - top) * s of finfo.min logits overflows
  m = top;
}

// Merges the state (m2, s2, w2) of another part into (m, s, w).
__device__ __forceinline__ void merge_softmax(float& m, float& s, float& w, float m2, float s2, float w2) {
  const float top = fmaxf(m, m2);
  if (top == -CUDART_INF_F) {  // both parts hold only -inf (s and w are 0) or NaN (s and w are NaN): keep a NaN
    s += s2;
    w += w2;
    return;
  }
  rebase_softmax(m, s, w, top);
  rebase_softmax(m2, s2, w2, top);
  s += s2;
  w += w2;
}

// Warp-wide merge of (m, s, w) in a fixed butterfly order; every lane ends with the result.
__device__ __forceinline__ void warp_merge_softmax(float& m, float& s, float& w) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, offset);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, offset);
    const float w2 = __shfl_xor_sync(0xffffffffu, w, offset);
    merge_softmax(m, s, w, m2, s2, w2);
  }
}

// Block-wide merge of (m, s, w); the result is valid in thread 0. blockDim.x must be a multiple of 32.
__device__ __forceinline__ void block_merge_softmax(float& m, float& s, float& w) {
  __shared__ float shared[3][32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  warp_merge_softmax(m, s, w);
  if (lane == 0) {
    shared[0][warp] = m;
    shared[1][warp] = s;
    shared[2][warp] = w;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x >> 5;
    m = lane < warps ? shared[0][lane] : -CUDART_INF_F;
    s = lane < warps ? shared[1][lane] : 0.f;
    w = lane < warps ? shared[2][lane] : 0.f;
    warp_merge_softmax(m, s, w);
  }
}

}  // namespace mdapo
