// Fused sketch update: per block of kBlock rows, z = x_b Ω (kBlock x kp, in L1), then
// y += x_bᵀ z while x_b is still in L2. MKL runs the two skinny GEMMs (k = S + 10 columns) at
// 50-60 GFLOP/s on the project machine, each streaming x from memory; this kernel reads x once.
#include "sketch.h"

#include <omp.h>

#include <algorithm>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace lelp {

namespace {

constexpr int64_t kBlock = 64;  // rows per block: x_b is 64 d floats (L2), z is 64 x kp (L1)
constexpr int64_t kPad = 8;

// Portable reference of one block: z = x_b Ω, then y += x_bᵀ z (fp32 partial y).
void block_portable(const float* x, int64_t rows, int64_t d, const float* omega, int64_t kp, float* z,
                    float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    float* zr = z + r * kp;
    std::fill(zr, zr + kp, 0.f);
    for (int64_t i = 0; i < d; ++i) {
      const float xv = x[r * d + i];
      for (int64_t j = 0; j < kp; ++j) zr[j] += xv * omega[i * kp + j];
    }
  }
  for (int64_t i = 0; i < d; ++i)
    for (int64_t r = 0; r < rows; ++r) {
      const float xv = x[r * d + i];
      for (int64_t j = 0; j < kp; ++j) y[i * kp + j] += xv * z[r * kp + j];
    }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LELP_HAVE_AVX2_SKETCH 1
// z rows r0..r0+3, columns j0..j0+8NV: 4 x NV accumulators over the whole d loop.
template <int NV>
__attribute__((target("avx2,fma"), always_inline)) inline void z_tile(const float* x, int64_t d, const float* omega,
                                                                      int64_t kp, int64_t j0, float* z) {
  __m256 a[4][NV];
  for (int r = 0; r < 4; ++r)
    for (int v = 0; v < NV; ++v) a[r][v] = _mm256_setzero_ps();
  for (int64_t i = 0; i < d; ++i) {
    __m256 w[NV];
    for (int v = 0; v < NV; ++v) w[v] = _mm256_loadu_ps(omega + i * kp + j0 + 8 * v);
    for (int r = 0; r < 4; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * d + i);
      for (int v = 0; v < NV; ++v) a[r][v] = _mm256_fmadd_ps(xv, w[v], a[r][v]);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(z + r * kp + j0 + 8 * v, a[r][v]);
}

// y rows i0..i0+3, columns j0..j0+8NV += Σ_r x[r, i] z[r, j] over the block's rows.
template <int NV>
__attribute__((target("avx2,fma"), always_inline)) inline void y_tile(const float* x, int64_t rows, int64_t d,
                                                                      const float* z, int64_t kp, int64_t i0,
                                                                      int64_t j0, float* y) {
  __m256 a[4][NV];
  for (int q = 0; q < 4; ++q)
    for (int v = 0; v < NV; ++v) a[q][v] = _mm256_loadu_ps(y + (i0 + q) * kp + j0 + 8 * v);
  for (int64_t r = 0; r < rows; ++r) {
    __m256 zv[NV];
    for (int v = 0; v < NV; ++v) zv[v] = _mm256_loadu_ps(z + r * kp + j0 + 8 * v);
    for (int q = 0; q < 4; ++q) {
      const __m256 xv = _mm256_broadcast_ss(x + r * d + i0 + q);
      for (int v = 0; v < NV; ++v) a[q][v] = _mm256_fmadd_ps(xv, zv[v], a[q][v]);
    }
  }
  for (int q = 0; q < 4; ++q)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(y + (i0 + q) * kp + j0 + 8 * v, a[q][v]);
}

// Column groups of 24, then 16 or 8 (3, 2, 1 vectors: kp is a multiple of 8).
__attribute__((target("avx2,fma"))) void block_avx2(const float* x, int64_t rows, int64_t d, const float* omega,
                                                    int64_t kp, float* z, float* y) {
  if (rows % 4 != 0 || d % 4 != 0) {  // ragged edges: the portable loop (rare: last block, odd d)
    block_portable(x, rows, d, omega, kp, z, y);
    return;
  }
  const int64_t full = kp / 24 * 24, rest = kp - full;
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    const float* xr = x + r0 * d;
    float* zr = z + r0 * kp;
    for (int64_t j0 = 0; j0 < full; j0 += 24) z_tile<3>(xr, d, omega, kp, j0, zr);
    if (rest == 16) z_tile<2>(xr, d, omega, kp, full, zr);
    if (rest == 8) z_tile<1>(xr, d, omega, kp, full, zr);
  }
  for (int64_t i0 = 0; i0 < d; i0 += 4) {
    for (int64_t j0 = 0; j0 < full; j0 += 24) y_tile<3>(x, rows, d, z, kp, i0, j0, y);
    if (rest == 16) y_tile<2>(x, rows, d, z, kp, i0, full, y);
    if (rest == 8) y_tile<1>(x, rows, d, z, kp, i0, full, y);
  }
}

bool have_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

using BlockFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, float*, float*);

BlockFn pick_block() {
#ifdef LELP_HAVE_AVX2_SKETCH
  if (have_avx2_fma()) return block_avx2;
#endif
  return block_portable;
}

}  // namespace

int64_t sketch_column_pad() { return kPad; }

void sketch_update_cpu(const float* x, int64_t n, int64_t d, const float* omega, int64_t kp, double* y,
                       double* sumsq) {
  const BlockFn block = pick_block();
  const int threads = omp_get_max_threads();
  const int64_t n_blocks = (n + kBlock - 1) / kBlock;
  // Per-thread fp32 partials of y (each sums at most a chunk's rows, like a BLAS GEMM would), then
  // a reduction into fp64 in thread order, so the result is deterministic for a thread count.
  std::vector<float> partial(static_cast<size_t>(threads) * d * kp, 0.f);
  std::vector<double> partial_sq(threads, 0.0);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    float* my_y = partial.data() + static_cast<size_t>(t) * d * kp;
    std::vector<float> z(kBlock * kp);
    double sq = 0.0;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int64_t r0 = b * kBlock, rows = std::min(kBlock, n - r0);
      const float* xb = x + r0 * d;
      block(xb, rows, d, omega, kp, z.data(), my_y);
      for (int64_t r = 0; r < rows; ++r) {
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < d; ++i) s += xb[r * d + i] * xb[r * d + i];
        sq += s;
      }
    }
    partial_sq[t] = sq;
  }
  for (int t = 0; t < threads; ++t) {
    const float* p = partial.data() + static_cast<size_t>(t) * d * kp;
    for (int64_t k = 0; k < d * kp; ++k) y[k] += p[k];
    *sumsq += partial_sq[t];
  }
}

}  // namespace lelp
