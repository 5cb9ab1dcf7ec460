// CPU (OpenMP) fused targets: projection h [A | W^T] + [e | b] and both
// segmented log-softmaxes in one pass over the embeddings.
#include "targets.h"

#include <algorithm>
#include <vector>

#include "convert.h"
#include "lelp/row_math.h"

namespace lelp {

namespace {
// Rows per tile: enough to reuse each weight row from L1 several times.
constexpr int64_t kTileRows = 8;
}  // namespace

void targets_cpu(const TargetsArgs& a) {
  const int64_t K = a.C * a.S;
  const int64_t J = a.J;
  const int64_t n_tiles = (a.n + kTileRows - 1) / kTileRows;
  const char* emb = static_cast<const char*>(a.embeddings);
  const int64_t emb_row_bytes = a.emb_stride * cpu::dtype_size(a.emb_dtype);

#pragma omp parallel
  {
    std::vector<float> x(kTileRows * a.d);
    std::vector<float> acc(kTileRows * J);
    std::vector<float> z(a.C), row_out(K);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n_tiles; ++t) {
      const int64_t r0 = t * kTileRows;
      const int64_t rows = std::min(kTileRows, a.n - r0);
      for (int64_t r = 0; r < rows; ++r) {
        cpu::load_row(emb + (r0 + r) * emb_row_bytes, a.emb_dtype, a.d, &x[r * a.d]);
        std::copy(a.bias, a.bias + J, &acc[r * J]);
      }
      // acc[r, :] += x[r, k] * weight[k, :]; the inner j-loop vectorises.
      for (int64_t k = 0; k < a.d; ++k) {
        const float* wk = a.weight + k * J;
        for (int64_t r = 0; r < rows; ++r) {
          const float xv = x[r * a.d + k];
          float* ar = &acc[r * J];
          for (int64_t j = 0; j < J; ++j) ar[j] += xv * wk[j];
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = r0 + r;
        const float* u = &acc[r * J];
        const float* zr = u + K;  // class logits from the head follow the K projections
        if (a.logits != nullptr) {
          const char* lp = static_cast<const char*>(a.logits) +
                           row * a.logits_stride * cpu::dtype_size(a.logits_dtype);
          cpu::load_row(lp, a.logits_dtype, a.C, z.data());
          zr = z.data();
        }
        row_log_targets(u, zr, static_cast<int>(a.C), static_cast<int>(a.S), a.inv_beta,
                        a.inv_tau, row_out.data());
        char* op = static_cast<char*>(a.out) + row * a.out_stride * cpu::dtype_size(a.out_dtype);
        cpu::store_row(row_out.data(), K, a.out_dtype, op);
      }
    }
  }
}

}  // namespace lelp
