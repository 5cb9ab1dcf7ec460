// CUDA fused distillation loss: a group of W lanes per row with the row in registers and shuffle
// reductions (lelp/warp_loss.h, whose math is the CPU's lelp/loss_math.h).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "../cpu/loss.h"
#include "lelp/warp_loss.h"
#include "warp.cuh"

namespace lelp {
namespace {

constexpr int kThreads = 128;  // 4 warps per block
constexpr int kWarpsPerBlock = kThreads / 32;

// Blocks per SM the register budget allows: 4 (<= 128 registers), or 3 (<= 168) for 4 chunks per
// lane (16 or 20 values), whose kernels spilled 4-16 B at 128 registers (sm_90, nvcc 13.0).
template <int CH>
constexpr int kMinBlocks = CH >= 4 ? 3 : 4;

template <int W, int CH, int V>
__global__ void __launch_bounds__(kThreads, kMinBlocks<CH>)
    loss_kernel(LossArgs a, warp::OnlineTeachers online, bool vec) {
  extern __shared__ float smem[];  // per row: the online projections and/or the class sums (loss_row_scratch_floats)
  const int warp_in_block = threadIdx.x / 32;
  const int64_t warp_id = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp_in_block;
  const int64_t n_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const int64_t row_floats = warp::loss_row_scratch_floats(a, online.m > 0);
  float* scratch = row_floats > 0 ? smem + warp_in_block * (32 / W) * row_floats : nullptr;
  warp::loss_rows<cuda::DeviceWarp<W>, CH, V>(cuda::DeviceWarp<W>{}, a, online, scratch, warp_id, n_warps, vec);
}

template <int W, int CH, int V>
void launch(const LossArgs& a, const warp::OnlineTeachers& online, cudaStream_t stream) {
  const int64_t rows_per_block = kWarpsPerBlock * (32 / W);
  const int64_t blocks = std::min<int64_t>((a.n + rows_per_block - 1) / rows_per_block, int64_t{1} << 20);
  const size_t smem = sizeof(float) * rows_per_block * warp::loss_row_scratch_floats(a, online.m > 0);
  loss_kernel<W, CH, V><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(a, online, warp::vector_loads_ok(a));
}

}  // namespace

void loss_cuda(const LossArgs& a, void* stream_handle) {
  if (a.C * a.S > 512) throw std::invalid_argument("cuda loss: K = C*S must be <= 512");
  if (a.n == 0) return;
  const warp::OnlineTeachers online = warp::online_teachers(a);
  const auto stream = static_cast<cudaStream_t>(stream_handle);
  warp::with_loss_layout(a, [&](auto width, auto chunks, auto vec) {
    launch<decltype(width)::value, decltype(chunks)::value, decltype(vec)::value>(a, online, stream);
  });
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("cuda loss launch failed: ") + cudaGetErrorString(err));
}

}  // namespace lelp
