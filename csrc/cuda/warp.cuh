// The GPU Warp of the warp kernels (lelp/warp_loss.h, lelp/block_targets.h): shuffle butterflies
// over groups of W lanes, and 16-byte (fp32) or 8-byte (bf16/fp16) row loads and stores.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "lelp/row_math.h"

namespace lelp {
namespace cuda {

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

template <int W>
struct DeviceWarp {
  static constexpr int kWidth = W;
  __device__ __forceinline__ int lane() const { return threadIdx.x & 31; }
  __device__ __forceinline__ float sum(float v) const {
#pragma unroll
    for (int o = W / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
  }
  __device__ __forceinline__ float max(float v) const {
#pragma unroll
    for (int o = W / 2; o > 0; o >>= 1) v = fmax_(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
  }
  // The sum over aligned runs of n lanes of the group (n a power of two <= W, the same in every lane):
  // every level is shuffled, the ones with offset >= n are not added, so the loop unrolls.
  __device__ __forceinline__ float sum_within(float v, int n) const {
#pragma unroll
    for (int o = W / 2; o > 0; o >>= 1) {
      const float x = __shfl_xor_sync(0xffffffffu, v, o);
      if (o < n) v += x;
    }
    return v;
  }
  __device__ __forceinline__ float xor_lane(float v, int o) const { return __shfl_xor_sync(0xffffffffu, v, o); }
  __device__ __forceinline__ float from_lane(float v, int l) const { return __shfl_sync(0xffffffffu, v, l); }
  __device__ __forceinline__ bool any(bool p) const { return __any_sync(0xffffffffu, p); }  // over the warp
  __device__ __forceinline__ void sync() const { __syncwarp(); }
  static __device__ __forceinline__ float load(const void* p, int dtype, int64_t i) { return cuda::load(p, dtype, i); }
  // Four consecutive elements from an aligned address (the caller checked the alignment).
  static __device__ __forceinline__ void load4(const void* p, int dtype, int64_t i, float* v) {
    if (dtype == kFloat32) {
      const float4 x = *reinterpret_cast<const float4*>(static_cast<const float*>(p) + i);
      v[0] = x.x, v[1] = x.y, v[2] = x.z, v[3] = x.w;
      return;
    }
    const uint2 raw = *reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(p) + i);
    if (dtype == kFloat16) {
      const float2 lo = __half22float2(*reinterpret_cast<const __half2*>(&raw.x));
      const float2 hi = __half22float2(*reinterpret_cast<const __half2*>(&raw.y));
      v[0] = lo.x, v[1] = lo.y, v[2] = hi.x, v[3] = hi.y;
    } else {
      const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
      const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
      v[0] = lo.x, v[1] = lo.y, v[2] = hi.x, v[3] = hi.y;
    }
  }
  static __device__ __forceinline__ void store(void* p, int dtype, int64_t i, float v) { cuda::store(p, dtype, i, v); }
  // Four consecutive elements to an aligned address: 16 bytes in fp32, 8 in bf16/fp16. In PTX, so
  // that the compiler cannot merge it with the element-wise tail path into four narrow stores (it
  // did at sm_80 in the 128-register K = 512 kernel).
  static __device__ __forceinline__ void store4(void* p, int dtype, int64_t i, const float* v) {
    if (dtype == kFloat32) {
      asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(static_cast<float*>(p) + i), "f"(v[0]),
                   "f"(v[1]), "f"(v[2]), "f"(v[3])
                   : "memory");
      return;
    }
    uint32_t lo, hi;
    if (dtype == kFloat16) {
      const __half2 a = __floats2half2_rn(v[0], v[1]), b = __floats2half2_rn(v[2], v[3]);
      lo = *reinterpret_cast<const uint32_t*>(&a), hi = *reinterpret_cast<const uint32_t*>(&b);
    } else {
      const __nv_bfloat162 a = __floats2bfloat162_rn(v[0], v[1]), b = __floats2bfloat162_rn(v[2], v[3]);
      lo = *reinterpret_cast<const uint32_t*>(&a), hi = *reinterpret_cast<const uint32_t*>(&b);
    }
    asm volatile("st.global.v2.u32 [%0], {%1, %2};\n" ::"l"(static_cast<uint16_t*>(p) + i), "r"(lo), "r"(hi)
                 : "memory");
  }
};

}  // namespace cuda
}  // namespace lelp
