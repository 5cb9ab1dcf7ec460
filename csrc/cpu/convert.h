// Storage-dtype loads and stores for the CPU kernels (fp32 math throughout).
#pragma once

#include <cstdint>
#include <cstring>

#include "lelp/row_math.h"

namespace lelp {
namespace cpu {

// GCC/Clang's _Float16 gives IEEE round-to-nearest-even conversions (F16C
// instructions where the target has them, a libgcc routine otherwise).
__attribute__((always_inline)) inline float half_bits_to_float(uint16_t b) {
  _Float16 h;
  std::memcpy(&h, &b, sizeof h);
  return static_cast<float>(h);
}

__attribute__((always_inline)) inline uint16_t float_to_half_bits(float f) {
  _Float16 h = static_cast<_Float16>(f);
  uint16_t b;
  std::memcpy(&b, &h, sizeof b);
  return b;
}

// Converts n values of dtype `dtype` at `src` to fp32.
__attribute__((always_inline)) inline void load_row(const void* src, int dtype, int64_t n, float* dst) {
  switch (dtype) {
    case kFloat32:
      std::memcpy(dst, src, n * sizeof(float));
      break;
    case kFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = half_bits_to_float(p[i]);
      break;
    }
    default: {
      const uint16_t* p = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_float(p[i]);
      break;
    }
  }
}

// Stores n fp32 values to `dst` in dtype `dtype`.
__attribute__((always_inline)) inline void store_row(const float* src, int64_t n, int dtype, void* dst) {
  switch (dtype) {
    case kFloat32:
      std::memcpy(dst, src, n * sizeof(float));
      break;
    case kFloat16: {
      uint16_t* p = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) p[i] = float_to_half_bits(src[i]);
      break;
    }
    default: {
      uint16_t* p = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) p[i] = float_to_bf16_bits(src[i]);
      break;
    }
  }
}

inline int64_t dtype_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

}  // namespace cpu
}  // namespace lelp
