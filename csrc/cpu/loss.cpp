// CPU (OpenMP) fused distillation loss: targets (precomputed, mixed, or computed
// from the teacher embeddings), the divergence and its gradient, one pass per row.
#include "loss.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "convert.h"
#include "lelp/loss_math.h"

namespace lelp {

namespace {

// log t = log sum_m w_m t_m, computed as a logsumexp over teachers (zero weights skipped).
void mix_row(const LossArgs& a, int64_t row, float* scratch, float* log_t) {
  const int64_t K = a.C * a.S;
  const char* base = static_cast<const char*>(a.log_targets) +
                     row * a.targets_stride * cpu::dtype_size(a.targets_dtype);
  if (a.n_teachers == 1 && a.weights == nullptr) {
    cpu::load_row(base, a.targets_dtype, K, log_t);
    return;
  }
  const float* w = a.weights + row * a.n_teachers;
  std::fill(log_t, log_t + K, -INFINITY);
  for (int64_t m = 0; m < a.n_teachers; ++m) {
    if (!(w[m] > 0.f)) continue;
    cpu::load_row(base + m * K * cpu::dtype_size(a.targets_dtype), a.targets_dtype, K, scratch);
    const float log_w = std::log(w[m]);
    for (int64_t k = 0; k < K; ++k) log_t[k] = logaddexp_(log_t[k], log_w + scratch[k]);
  }
}

}  // namespace

void loss_cpu(const LossArgs& a) {
  const int64_t K = a.C * a.S;
  const int64_t tile = a.online != nullptr ? targets_tile_rows() : 1;
  const int64_t n_tiles = (a.n + tile - 1) / tile;
  const int64_t student_row_bytes = a.student_stride * cpu::dtype_size(a.student_dtype);
#pragma omp parallel
  {
    std::vector<float> s(K), log_q(K), scratch(K), log_t(tile * K);
    TargetsWorkspace* ws = a.online != nullptr ? new TargetsWorkspace(*a.online) : nullptr;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n_tiles; ++t) {
      const int64_t r0 = t * tile;
      const int64_t rows = std::min(tile, a.n - r0);
      if (ws != nullptr) targets_tile(*a.online, r0, *ws, log_t.data());
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = r0 + r;
        float* g = a.grad + row * K;
        const int64_t label = a.labels != nullptr ? a.labels[row] : -1;
        if (a.labels != nullptr && label == a.ignore_index) {
          a.loss_rows[row] = 0.f;
          std::fill(g, g + K, 0.f);
          continue;
        }
        float* lt = &log_t[r * K];
        if (ws == nullptr) mix_row(a, row, scratch.data(), lt);
        cpu::load_row(static_cast<const char*>(a.student) + row * student_row_bytes, a.student_dtype, K,
                      s.data());
        a.loss_rows[row] = row_loss_grad(s.data(), lt, static_cast<int>(a.C), static_cast<int>(a.S),
                                         a.divergence, a.tau, a.alpha, static_cast<int>(label),
                                         log_q.data(), g);
      }
    }
    delete ws;
  }
}

}  // namespace lelp
