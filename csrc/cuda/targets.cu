// CUDA fused targets: one thread per row (a correct baseline; the tuned
// kernels are tracked in the fused-kernels work). Same row math as the CPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "../cpu/targets.h"
#include "lelp/row_math.h"

namespace lelp {
namespace {

constexpr int kMaxK = 512;
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

__global__ void targets_kernel(TargetsArgs a) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= a.n) return;
  const int64_t K = a.C * a.S;
  float u[kMaxK + kMaxC];
  float z[kMaxC];
  float out[kMaxK];
  for (int64_t j = 0; j < a.J; ++j) u[j] = a.bias[j];
  for (int64_t k = 0; k < a.d; ++k) {
    const float x = load(a.embeddings, a.emb_dtype, row * a.emb_stride + k);
    for (int64_t j = 0; j < a.J; ++j) u[j] += x * a.weight[k * a.J + j];
  }
  const float* zr = u + K;
  if (a.logits != nullptr) {
    for (int64_t c = 0; c < a.C; ++c) z[c] = load(a.logits, a.logits_dtype, row * a.logits_stride + c);
    zr = z;
  }
  row_log_targets(u, zr, static_cast<int>(a.C), static_cast<int>(a.S), a.inv_beta, a.inv_tau, out);
  for (int64_t j = 0; j < K; ++j) store(a.out, a.out_dtype, row * a.out_stride + j, out[j]);
}

}  // namespace

void targets_cuda(const TargetsArgs& a, void* stream) {
  if (a.C * a.S > kMaxK || a.C > kMaxC)
    throw std::invalid_argument("cuda targets: K = C*S must be <= 512");
  if (a.n == 0) return;
  const int threads = 128;
  const unsigned blocks = static_cast<unsigned>((a.n + threads - 1) / threads);
  targets_kernel<<<blocks, threads, 0, static_cast<cudaStream_t>(stream)>>>(a);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("cuda targets launch failed: ") + cudaGetErrorString(err));
}

}  // namespace lelp
