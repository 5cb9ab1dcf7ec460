#pragma once

#include <cstdint>

namespace lelp {

// The fit's per-chunk bucketing, in one pass over the chunk:
//   rows grouped by class (stable), converted to fp32, minus their class shift;
//   per-class counts and fp64 sums of the shifted rows; non-finite rows flagged.
struct BucketArgs {
  const void* src;      // n x d, dtype src_dtype, row stride src_stride (elements)
  int src_dtype;
  int64_t src_stride;
  int64_t n, d;
  const int64_t* labels;  // n labels in [0, C)
  int64_t num_classes;
  const float* shift;   // C x d fp32
  float* out;           // n x d fp32, contiguous: class 0 rows, then class 1, ...
  int64_t* counts;      // C
  double* sums;         // C x d: sum over the class's rows of (row - shift)
  uint8_t* nonfinite;   // n flags over the *input* rows
};

// Returns the number of non-finite rows, or -(r + 1) if label r is out of range
// (then nothing else is written).
int64_t bucket_rows_cpu(const BucketArgs& a);

}  // namespace lelp
