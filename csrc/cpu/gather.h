#pragma once

#include <cstdint>

namespace lelp {

// out[i, :] = float(src[index[i], :]) - shift[row_class[i], :]
struct GatherArgs {
  const void* src;           // rows x d, dtype src_dtype, row stride src_stride (elements)
  int src_dtype;
  int64_t src_stride;
  int64_t d;
  const int64_t* index;      // n source rows to read, or nullptr for 0..n-1
  int64_t n;
  const int64_t* row_class;  // n class ids selecting the shift row, or nullptr for class 0
  const float* shift;        // C x d fp32, or nullptr for no shift
  float* out;                // n x d fp32, contiguous
  uint8_t* nonfinite;        // n flags set to 1 where the row holds NaN/Inf, or nullptr
};

// Returns the number of rows holding NaN or Inf (checked on the fp32 values, for free).
int64_t gather_rows_cpu(const GatherArgs& a);

}  // namespace lelp
