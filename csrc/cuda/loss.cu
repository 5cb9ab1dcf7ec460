// CUDA fused distillation loss: one thread per row (a correct baseline, like the
// targets kernel; not yet measured on a GPU), the same math as the CPU (lelp/loss_math.h).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "../cpu/loss.h"
#include "lelp/loss_math.h"
#include "row_targets.cuh"

namespace lelp {
namespace {

using cuda::kMaxK;
using cuda::load;

// The online teachers' projections, passed by value as a kernel parameter.
constexpr int kMaxOnlineTeachers = 8;
struct OnlineTeachers {
  TargetsArgs t[kMaxOnlineTeachers];
  int m;  // 0: precomputed targets
};

__global__ void loss_kernel(LossArgs a, OnlineTeachers online) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= a.n) return;
  const int K = static_cast<int>(a.C * a.S);
  float* g = a.grad + row * K;
  const int64_t label = a.labels != nullptr ? a.labels[row] : -1;
  if (a.labels != nullptr && label == a.ignore_index) {
    a.loss_rows[row] = 0.f;
    if (a.hard_rows != nullptr) a.hard_rows[row] = 0.f;
    for (int k = 0; k < K; ++k) g[k] = 0.f;
    return;
  }
  float log_t[kMaxK], s[kMaxK], work[3 * kMaxK + 4];
  if (online.m > 0 && a.weights == nullptr) {
    cuda::row_targets(online.t[0], row, log_t);
  } else if (online.m > 0) {
    for (int k = 0; k < K; ++k) log_t[k] = -INFINITY;
    for (int m = 0; m < online.m; ++m) {
      const float w = a.weights[row * a.n_teachers + m];
      if (w == 0.f) continue;  // NaN or negative weights give NaN, never a finite loss
      cuda::row_targets(online.t[m], row, s);  // s as scratch; the student row is loaded below
      const float log_w = logf(w);
      for (int k = 0; k < K; ++k) log_t[k] = logaddexp_(log_t[k], log_w + s[k]);
    }
  } else if (a.weights == nullptr) {
    for (int k = 0; k < K; ++k) log_t[k] = load(a.log_targets, a.targets_dtype, row * a.targets_stride + k);
  } else {
    for (int k = 0; k < K; ++k) log_t[k] = -INFINITY;
    for (int64_t m = 0; m < a.n_teachers; ++m) {
      const float w = a.weights[row * a.n_teachers + m];
      if (w == 0.f) continue;  // NaN or negative weights give NaN, never a finite loss
      const float log_w = logf(w);
      for (int k = 0; k < K; ++k)
        log_t[k] = logaddexp_(log_t[k], log_w + load(a.log_targets, a.targets_dtype, row * a.targets_stride + m * K + k));
    }
  }
  for (int k = 0; k < K; ++k) s[k] = load(a.student, a.student_dtype, row * a.student_stride + k);
  const int64_t y = label;  // -1: no hard-label term
  block_loss_grad(1, s, log_t, static_cast<int>(a.C), static_cast<int>(a.S), a.divergence, a.jsd_beta, a.tau, a.alpha,
                  a.labels != nullptr ? &y : nullptr, work, g, a.loss_rows + row,
                  a.hard_rows != nullptr ? a.hard_rows + row : nullptr);
}

}  // namespace

void loss_cuda(const LossArgs& a, void* stream) {
  if (a.C * a.S > kMaxK) throw std::invalid_argument("cuda loss: K = C*S must be <= 512");
  if (a.n == 0) return;
  const int threads = 128;
  const unsigned blocks = static_cast<unsigned>((a.n + threads - 1) / threads);
  OnlineTeachers online{};
  if (a.online != nullptr) {
    if (a.n_teachers > kMaxOnlineTeachers)
      throw std::invalid_argument("cuda loss: at most 8 online teachers (pass precomputed targets for more)");
    online.m = static_cast<int>(a.n_teachers);
    for (int m = 0; m < online.m; ++m) online.t[m] = a.online[m];
  }
  loss_kernel<<<blocks, threads, 0, static_cast<cudaStream_t>(stream)>>>(a, online);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("cuda loss launch failed: ") + cudaGetErrorString(err));
}

}  // namespace lelp
