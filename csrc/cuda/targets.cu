// CUDA fused targets: one thread per row (a correct baseline; not yet measured on a GPU).
// Same row math as the CPU (lelp/row_math.h).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "../cpu/targets.h"
#include "row_targets.cuh"

namespace lelp {
namespace {

__global__ void targets_kernel(TargetsArgs a) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= a.n) return;
  const int64_t K = a.C * a.S;
  float out[cuda::kMaxK];
  cuda::row_targets(a, row, out);
  for (int64_t j = 0; j < K; ++j) cuda::store(a.out, a.out_dtype, row * a.out_stride + j, out[j]);
}

}  // namespace

void targets_cuda(const TargetsArgs& a, void* stream) {
  if (a.C * a.S > cuda::kMaxK || a.C > cuda::kMaxC)
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
