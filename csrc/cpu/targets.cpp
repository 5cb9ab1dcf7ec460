// CPU (OpenMP) fused targets: projection h [A | W^T] + [e | b] and both
// segmented log-softmaxes in one pass over the embeddings.
#include "targets.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <vector>

#include "convert.h"
#include "lelp/row_math.h"

namespace lelp {

namespace {

// Register-blocked projection: a block of kRows x (8, 16 or 24) accumulators stays in
// registers across the whole d loop, so J is padded to a multiple of 8 only (J = 18
// computes 24 columns in one block).
constexpr int64_t kRows = 4;
constexpr int64_t kPad = 8;

// x: kRows x d (fp32), w: d x jp (jp a multiple of kPad), bias: jp.
// Writes acc: kRows x jp.
using ProjectTileFn = void (*)(const float*, int64_t, const float*, const float*, int64_t, float*);

void project_tile_portable(const float* x, int64_t d, const float* w, const float* bias, int64_t jp,
                           float* acc) {
  for (int64_t r = 0; r < kRows; ++r) std::copy(bias, bias + jp, acc + r * jp);
  for (int64_t k = 0; k < d; ++k) {
    const float* wk = w + k * jp;
    for (int64_t r = 0; r < kRows; ++r) {
      const float xv = x[r * d + k];
      float* ar = acc + r * jp;
      for (int64_t j = 0; j < jp; ++j) ar[j] += xv * wk[j];
    }
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LELP_HAVE_AVX2_KERNEL 1
// Columns [j0, j0 + 8 NV) of the tile: 4 x NV accumulators, NV weight vectors and one broadcast
// live in the 16 ymm registers across the whole d loop. Two FMA pipes of latency 4 need at least
// 8 independent accumulators, so NV = 3 (12) and NV = 2 (8) run at full rate, NV = 1 at half.
template <int NV>
__attribute__((target("avx2,fma"), always_inline)) inline void project_block_avx2(
    const float* x, int64_t d, const float* w, const float* bias, int64_t jp, int64_t j0, float* acc) {
  __m256 a[kRows][NV];
  for (int v = 0; v < NV; ++v) {
    a[0][v] = _mm256_loadu_ps(bias + j0 + 8 * v);
    for (int r = 1; r < kRows; ++r) a[r][v] = a[0][v];
  }
  for (int64_t k = 0; k < d; ++k) {
    const float* wk = w + k * jp + j0;
    __m256 wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = _mm256_loadu_ps(wk + 8 * v);
    for (int r = 0; r < kRows; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * d + k);
      for (int v = 0; v < NV; ++v) a[r][v] = _mm256_fmadd_ps(xv, wv[v], a[r][v]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(acc + r * jp + j0 + 8 * v, a[r][v]);
}

__attribute__((target("avx2,fma"))) void project_tile_avx2(const float* x, int64_t d, const float* w,
                                                           const float* bias, int64_t jp, float* acc) {
  // 24-column blocks, then 16-column ones; a lone 8-column rest turns 24 + 8 into 16 + 16.
  int64_t n24 = jp / 24, rest = jp % 24;
  if (rest == 8 && n24 > 0) --n24, rest += 24;
  int64_t j0 = 0;
  for (int64_t b = 0; b < n24; ++b, j0 += 24) project_block_avx2<3>(x, d, w, bias, jp, j0, acc);
  for (; rest >= 16; rest -= 16, j0 += 16) project_block_avx2<2>(x, d, w, bias, jp, j0, acc);
  if (rest == 8) project_block_avx2<1>(x, d, w, bias, jp, j0, acc);
}
#endif

// LELP_FAST_CPU_ISA=portable forces the portable loop (used by the tests).
bool use_avx2() {
  const char* isa = std::getenv("LELP_FAST_CPU_ISA");
  if (isa != nullptr && std::strcmp(isa, "portable") == 0) return false;
#ifdef LELP_HAVE_AVX2_KERNEL
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

ProjectTileFn pick_project_tile() {
#ifdef LELP_HAVE_AVX2_KERNEL
  if (use_avx2()) return project_tile_avx2;
#endif
  return project_tile_portable;
}

}  // namespace

const char* cpu_isa() { return pick_project_tile() == project_tile_portable ? "portable" : "avx2"; }

TargetsWorkspace::TargetsWorkspace(const TargetsArgs& a)
    : jp((a.J + kPad - 1) / kPad * kPad),
      weight(a.d * jp, 0.f),
      bias(jp, 0.f),
      x(kRows * a.d, 0.f),
      acc(kRows * jp),
      z(a.C) {
  // Weight and bias padded with zero columns to a multiple of kPad (tiny: d x jp).
  for (int64_t k = 0; k < a.d; ++k) std::copy(a.weight + k * a.J, a.weight + (k + 1) * a.J, &weight[k * jp]);
  std::copy(a.bias, a.bias + a.J, bias.begin());
}

int64_t targets_tile_rows() { return kRows; }

// Inlined into a generic and an AVX2/FMA/F16C build (conversions and row math vectorise there).
__attribute__((always_inline)) inline void targets_tile_impl(const TargetsArgs& a, int64_t r0, TargetsWorkspace& ws,
                                                             float* log_t, ProjectTileFn project_tile) {
  const int64_t K = a.C * a.S;
  const int64_t rows = std::min(kRows, a.n - r0);
  const char* emb = static_cast<const char*>(a.embeddings);
  const int64_t emb_row_bytes = a.emb_stride * cpu::dtype_size(a.emb_dtype);
  for (int64_t r = 0; r < rows; ++r)
    cpu::load_row(emb + (r0 + r) * emb_row_bytes, a.emb_dtype, a.d, &ws.x[r * a.d]);
  project_tile(ws.x.data(), a.d, ws.weight.data(), ws.bias.data(), ws.jp, ws.acc.data());
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = r0 + r;
    const float* u = &ws.acc[r * ws.jp];
    const float* zr = u + K;  // class logits from the head follow the K projections
    if (a.logits != nullptr) {
      const char* lp =
          static_cast<const char*>(a.logits) + row * a.logits_stride * cpu::dtype_size(a.logits_dtype);
      cpu::load_row(lp, a.logits_dtype, a.C, ws.z.data());
      zr = ws.z.data();
    }
    if (a.nonfinite != nullptr) {
      // A NaN/Inf embedding makes every projection NaN or Inf (0 * Inf is NaN too), so J sums
      // flag the row; the caller re-checks flagged rows exactly (a sum can also overflow).
      float sum = 0.f;
      for (int64_t j = 0; j < a.J; ++j) sum += u[j];
      if (a.logits != nullptr)
        for (int64_t c = 0; c < a.C; ++c) sum += zr[c];
      a.nonfinite[row] = !std::isfinite(sum);
    }
    row_log_targets(u, zr, static_cast<int>(a.C), static_cast<int>(a.S), a.inv_beta, a.inv_tau,
                    log_t + r * K);
  }
}

#ifdef LELP_HAVE_AVX2_KERNEL
__attribute__((target("avx2,fma,f16c"))) void targets_tile_avx2(const TargetsArgs& a, int64_t r0,
                                                                TargetsWorkspace& ws, float* log_t) {
  targets_tile_impl(a, r0, ws, log_t, project_tile_avx2);
}
#endif

void targets_tile(const TargetsArgs& a, int64_t r0, TargetsWorkspace& ws, float* log_t) {
  static const ProjectTileFn project_tile = pick_project_tile();
#ifdef LELP_HAVE_AVX2_KERNEL
  if (project_tile == project_tile_avx2) return targets_tile_avx2(a, r0, ws, log_t);
#endif
  targets_tile_impl(a, r0, ws, log_t, project_tile);
}

void targets_cpu(const TargetsArgs& a) {
  const int64_t K = a.C * a.S;
  const int64_t n_tiles = (a.n + kRows - 1) / kRows;
#pragma omp parallel
  {
    TargetsWorkspace ws(a);
    std::vector<float> out(kRows * K);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n_tiles; ++t) {
      const int64_t r0 = t * kRows;
      const int64_t rows = std::min(kRows, a.n - r0);
      targets_tile(a, r0, ws, out.data());
      for (int64_t r = 0; r < rows; ++r) {
        char* op = static_cast<char*>(a.out) + (r0 + r) * a.out_stride * cpu::dtype_size(a.out_dtype);
        cpu::store_row(&out[r * K], K, a.out_dtype, op);
      }
    }
  }
}

}  // namespace lelp
