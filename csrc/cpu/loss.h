#pragma once

#include <cstdint>

#include "targets.h"

namespace lelp {

// The fused distillation loss: per-row loss and dL/ds (before the reduction) in one pass.
// Targets come either precomputed (log_targets, M teachers mixed by per-row weights) or
// online from M teachers' embeddings and projectors (online != nullptr, mixed by the same
// weights), never materialised as N x K.
struct LossArgs {
  const void* student;  // N x K logits, dtype student_dtype, row stride student_stride
  int student_dtype;
  int64_t student_stride;
  int64_t n, C, S;
  const void* log_targets;  // N x M x K log-targets (row i, teacher m at i*targets_stride + m*K)
  int targets_dtype;
  int64_t targets_stride;
  int64_t n_teachers;       // M
  const float* weights;     // N x M fp32 mixing weights (rows sum to 1), or nullptr when M = 1
  const TargetsArgs* online;  // n_teachers projections: teacher embeddings -> targets in-kernel, or nullptr
  const int64_t* labels;    // N labels or nullptr
  int64_t ignore_index;
  int divergence;
  float jsd_beta;           // the generalised JSD's b (divergence kJS); 0.5 is the JS divergence
  float tau, alpha;
  float* loss_rows;         // N fp32 (0 for ignored rows)
  float* hard_rows;         // N fp32: the alpha * CE part of loss_rows, or nullptr
  float* grad;              // N x K, contiguous: fp32, or grad_dtype. Ignored rows: 0 (the CPU kernel), or
                            // 0 times the row's values (the CUDA and Triton kernels: NaN where they are).
                            // nullptr (CPU kernel only): forward only, no gradient written (no_grad)
  // Optional N flags for the input check, filled in the same pass (CPU only): bit 0 the student
  // row's fp32 sum is not finite, bit 1 an offline teacher's log-target row sum is not <= 0 (NaN,
  // +Inf or a value > 0 in it). Flagged rows are re-checked exactly by the caller (a sum of finite
  // values can overflow; -Inf log-targets are probabilities of 0).
  uint8_t* suspect = nullptr;
  // grad's dtype code (lelp::DType) and an optional 1-element fp32 scale folded into it (host memory
  // on CPU, device memory on CUDA; nullptr: 1): the reduction's 1/rows, so that the gradient is
  // written once, in the student's dtype, and the backward has no N x K pass.
  int grad_dtype = 0;
  const float* grad_scale = nullptr;
  // KL only (CPU and CUDA kernels): the weight lambda of the subclass part, KL(t||q) = KL(p||Q) + sum_c p_c
  // KL(r_c||rho_c); 1 is the plain KL (see kl_row_subclass_weighted in lelp/loss_math.h).
  float subclass_weight = 1.f;
};

void loss_cpu(const LossArgs& a);
// out (N x K, dtype) = grad (N x K fp32, contiguous) * rows (N) row by row: the backward's scale
// and cast to the student's dtype in one pass.
void scale_rows_cpu(const float* grad, const float* rows, int64_t n, int64_t K, int dtype, void* out);
// "avx512", "avx2" or "portable": the loss kernel this process runs on CPU ("avx512" runs where K is a
// multiple of 16 and >= 64, and for KL rows of K <= 32 at lambda = 1 or S = 1 (the lane layout);
// AVX2 otherwise).
const char* loss_isa();
#ifdef LELP_WITH_CUDA
void loss_cuda(const LossArgs& a, void* stream);
#endif

}  // namespace lelp
