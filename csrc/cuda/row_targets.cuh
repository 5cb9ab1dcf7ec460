// Device helpers shared by the CUDA kernels: dtype loads/stores and one row of targets.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../cpu/targets.h"
#include "lelp/row_math.h"

namespace lelp {
namespace cuda {

constexpr int kMaxK = 512;  // largest K = C * S the one-thread-per-row kernels hold in registers
constexpr int kMaxC = 512;

__device__ __forceinline__ float load(const void* p, int dtype, int64_t i) {
  if (dtype == kFloat32) return static_cast<const float*>(p)[i];
  if (dtype == kFloat16) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

__device__ __forceinline__ void store(void* p, int dtype, int64_t i, float v) {
  if (dtype == kFloat32) static_cast<float*>(p)[i] = v;
  else if (dtype == kFloat16) static_cast<__half*>(p)[i] = __float2half_rn(v);
  else static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
}

// log t of one row: h [A | W^T] + [e | b], then both segmented log-softmaxes. out: K floats.
__device__ __forceinline__ void row_targets(const TargetsArgs& a, int64_t row, float* out) {
  const int64_t K = a.C * a.S;
  float u[kMaxK + kMaxC];
  float z[kMaxC];
  for (int64_t j = 0; j < a.J; ++j) u[j] = a.bias[j];
  for (int64_t k = 0; k < a.d; ++k) {
    const float x = load(a.embeddings, a.emb_dtype, row * a.emb_stride + k);
    for (int64_t j = 0; j < a.J; ++j) u[j] += x * a.weight[k * a.J + j];
  }
  const float* zr = u + K;  // class logits from the head follow the K projections
  if (a.logits != nullptr) {
    for (int64_t c = 0; c < a.C; ++c) z[c] = load(a.logits, a.logits_dtype, row * a.logits_stride + c);
    zr = z;
  }
  row_log_targets(u, zr, static_cast<int>(a.C), static_cast<int>(a.S), a.inv_beta, a.inv_tau, out);
}

}  // namespace cuda
}  // namespace lelp
