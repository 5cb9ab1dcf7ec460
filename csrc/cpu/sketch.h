#pragma once

#include <cstdint>

namespace lelp {

// The fit's Nyström sketch update for one class (docs/algorithm.md, streaming fit), fused:
//   y += xᵀ (x Ω)  and  sumsq += ‖x‖²_F
// x: n x d fp32 rows (contiguous); omega: d x kp fp32 (row-major; kp a multiple of 8, zero-padded
// columns give zero columns of y); y: d x kp fp64, accumulated. Rows are processed in blocks that
// stay in cache, so x is read from memory once instead of once per GEMM.
void sketch_update_cpu(const float* x, int64_t n, int64_t d, const float* omega, int64_t kp, double* y,
                       double* sumsq);

// Column padding the kernel needs (8).
int64_t sketch_column_pad();

}  // namespace lelp
