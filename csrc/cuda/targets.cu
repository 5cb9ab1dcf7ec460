// CUDA fused targets: a tensor-core tile (bf16/fp16 with a split map, fp32 as split TF32), a warp
// per row for wider maps (lelp/block_targets.h; the epilogue's math is lelp/row_math.h's).
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "../cpu/targets.h"
#include "lelp/block_targets.h"
#include "warp.cuh"

namespace lelp {
namespace {

namespace wmma = nvcuda::wmma;

struct DeviceBlock {
  using Warp = cuda::DeviceWarp<32>;
  __device__ __forceinline__ int thread() const { return threadIdx.x; }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
  __device__ __forceinline__ Warp warp() const { return Warp{}; }
};

// bf16/fp16 embeddings: WMMA 16 x 16 x 16 on T, the map split into hi + lo parts of T.
template <class T>
struct HalfMma {
  using Stage = uint16_t;
  static constexpr int kK = 16, kVec = 8;
  static constexpr bool kSplitX = false;
  using A = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
  using B = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  static __device__ __forceinline__ uint16_t bits(float v);
  static __device__ __forceinline__ float value(uint16_t b);
  static __device__ __forceinline__ void split_x(const void* emb, int64_t i, Stage* hi, Stage*) {
    *hi = static_cast<const uint16_t*>(emb)[i];
  }
  static __device__ __forceinline__ void split_x_vec(const void* emb, int64_t i, Stage* hi, Stage*) {
    *reinterpret_cast<uint4*>(hi) = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(emb) + i);
  }
  static __device__ __forceinline__ void split_w(float w, Stage* hi, Stage* lo) {
    *hi = bits(w);
    *lo = bits(w - value(*hi));
  }
  static __device__ __forceinline__ void fill(Acc& c, float v) { wmma::fill_fragment(c, v); }
  static __device__ __forceinline__ void load_a(A& f, const Stage* p, int ld) {
    wmma::load_matrix_sync(f, reinterpret_cast<const T*>(p), ld);
  }
  static __device__ __forceinline__ void load_b(B& f, const Stage* p, int ld) {
    wmma::load_matrix_sync(f, reinterpret_cast<const T*>(p), ld);
  }
  static __device__ __forceinline__ void mma(Acc& c, const A& a, const B& b) { wmma::mma_sync(c, a, b, c); }
  static __device__ __forceinline__ void store(const cuda::DeviceWarp<32>&, float* p, const Acc& c, int ld) {
    wmma::store_matrix_sync(p, c, ld, wmma::mem_row_major);
  }
};
template <>
__device__ __forceinline__ uint16_t HalfMma<__nv_bfloat16>::bits(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
template <>
__device__ __forceinline__ float HalfMma<__nv_bfloat16>::value(uint16_t b) { return __bfloat162float(__ushort_as_bfloat16(b)); }
template <>
__device__ __forceinline__ uint16_t HalfMma<__half>::bits(float v) { return __half_as_ushort(__float2half_rn(v)); }
template <>
__device__ __forceinline__ float HalfMma<__half>::value(uint16_t b) { return __half2float(__ushort_as_half(b)); }

// fp32 embeddings: WMMA 16 x 16 x 8 on TF32, both sides split into TF32 hi + lo (3 products).
struct Tf32Mma {
  using Stage = float;
  static constexpr int kK = 8, kVec = 4;
  static constexpr bool kSplitX = true;
  using A = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using B = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
  static __device__ __forceinline__ void split(float v, float* hi, float* lo) {
    *hi = wmma::__float_to_tf32(v);
    *lo = wmma::__float_to_tf32(v - *hi);
  }
  static __device__ __forceinline__ void split_x(const void* emb, int64_t i, Stage* hi, Stage* lo) {
    split(static_cast<const float*>(emb)[i], hi, lo);
  }
  static __device__ __forceinline__ void split_x_vec(const void* emb, int64_t i, Stage* hi, Stage* lo) {
    const float4 x = *reinterpret_cast<const float4*>(static_cast<const float*>(emb) + i);
    float4 h, l;
    split(x.x, &h.x, &l.x), split(x.y, &h.y, &l.y), split(x.z, &h.z, &l.z), split(x.w, &h.w, &l.w);
    *reinterpret_cast<float4*>(hi) = h;
    *reinterpret_cast<float4*>(lo) = l;
  }
  static __device__ __forceinline__ void split_w(float w, Stage* hi, Stage* lo) { split(w, hi, lo); }
  static __device__ __forceinline__ void fill(Acc& c, float v) { wmma::fill_fragment(c, v); }
  // The stages hold TF32 values already (split rounded them), so the loaded fragments need no conversion.
  static __device__ __forceinline__ void load_a(A& f, const Stage* p, int ld) { wmma::load_matrix_sync(f, p, ld); }
  static __device__ __forceinline__ void load_b(B& f, const Stage* p, int ld) { wmma::load_matrix_sync(f, p, ld); }
  static __device__ __forceinline__ void mma(Acc& c, const A& a, const B& b) { wmma::mma_sync(c, a, b, c); }
  static __device__ __forceinline__ void store(const cuda::DeviceWarp<32>&, float* p, const Acc& c, int ld) {
    wmma::store_matrix_sync(p, c, ld, wmma::mem_row_major);
  }
};

template <class Mma>
__global__ void __launch_bounds__(tile::kThreads, 4) targets_tile_kernel(TargetsArgs a, bool vec) {
  extern __shared__ __align__(128) char smem[];
  tile::targets_tiles<DeviceBlock, Mma>(DeviceBlock{}, a, smem, blockIdx.x, gridDim.x, vec);
}

__global__ void __launch_bounds__(128, 4) targets_row_kernel(TargetsArgs a) {
  extern __shared__ float row_smem[];  // K + C floats per warp
  const int warp_in_block = threadIdx.x / 32;
  float* u = row_smem + warp_in_block * warp::online_row_floats(a.C, a.S);
  tile::targets_rows(cuda::DeviceWarp<32>{}, a, u, static_cast<int64_t>(blockIdx.x) * 4 + warp_in_block,
                     static_cast<int64_t>(gridDim.x) * 4);
}

template <class Mma>
void launch_tile(const TargetsArgs& a, cudaStream_t stream) {
  const int64_t smem = tile::smem_bytes(a, sizeof(typename Mma::Stage));
  auto kernel = targets_tile_kernel<Mma>;
  // More than 48 KB of shared memory needs an opt-in (the widest fp32 map takes 102 KB). It is set
  // once per device for the largest size needed, so that a CUDA-graph capture after a warm-up run
  // makes no such call.
  static int opted_in[64] = {};
  int device = 0;
  cudaGetDevice(&device);
  if (smem > 48 * 1024 && (device >= 64 || opted_in[device] < smem)) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) throw std::runtime_error(std::string("cuda targets: ") + cudaGetErrorString(err));
    if (device < 64) opted_in[device] = static_cast<int>(smem);
  }
  const int64_t blocks = std::min<int64_t>((a.n + tile::kRows - 1) / tile::kRows, int64_t{1} << 20);
  kernel<<<static_cast<unsigned>(blocks), tile::kThreads, smem, stream>>>(a, tile::tile_vector_loads(a));
}

}  // namespace

void targets_cuda(const TargetsArgs& a, void* stream_handle) {
  if (a.C * a.S > 512) throw std::invalid_argument("cuda targets: K = C*S must be <= 512");
  if (a.n == 0) return;
  const auto stream = static_cast<cudaStream_t>(stream_handle);
  if (tile::tile_takes(a)) {
    if (a.emb_dtype == kBFloat16) launch_tile<HalfMma<__nv_bfloat16>>(a, stream);
    else if (a.emb_dtype == kFloat16) launch_tile<HalfMma<__half>>(a, stream);
    else launch_tile<Tf32Mma>(a, stream);
  } else {
    const int64_t blocks = std::min<int64_t>((a.n + 3) / 4, int64_t{1} << 20);
    const size_t smem = sizeof(float) * 4 * warp::online_row_floats(a.C, a.S);
    targets_row_kernel<<<static_cast<unsigned>(blocks), 128, smem, stream>>>(a);
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("cuda targets launch failed: ") + cudaGetErrorString(err));
}

}  // namespace lelp
