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

// bf16 embeddings on CPUs with AVX512-BF16: x is exact in bf16 and the fp32 map is split into
// bf16 hi + lo parts (hi = bf16(w), lo = bf16(w - hi): about 16 bits of the map), so two vdpbf16ps
// products per k-pair give fp32-like projections (fp32 accumulation; each bf16 product is exact in
// fp32) without widening x: the floor the issue names ("two bf16 products"). Pairs of k are
// interleaved per column, so one zmm holds 16 columns x 2 k of hi (or lo).
// xb: kRows x dp (dp = d rounded up to even, zero-padded) bf16 bits; whi/wlo: (dp / 2) x jp x 2.
template <int NV>
__attribute__((target("avx512f,avx512bf16"), always_inline)) inline void project_block_bf16(
    const uint16_t* xb, int64_t dp, const uint16_t* whi, const uint16_t* wlo, const float* bias, int64_t jp,
    int64_t j0, float* acc) {
  // Separate hi and lo accumulators: 2 x kRows x NV independent chains against vdpbf16ps's latency.
  __m512 a[kRows][NV], l[kRows][NV];
  for (int v = 0; v < NV; ++v) {
    a[0][v] = _mm512_loadu_ps(bias + j0 + 16 * v);
    for (int r = 1; r < kRows; ++r) a[r][v] = a[0][v];
    for (int r = 0; r < kRows; ++r) l[r][v] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < dp / 2; ++p) {
    __m512i hv[NV], lv[NV];
    for (int v = 0; v < NV; ++v) {
      hv[v] = _mm512_loadu_si512(whi + (p * jp + j0 + 16 * v) * 2);
      lv[v] = _mm512_loadu_si512(wlo + (p * jp + j0 + 16 * v) * 2);
    }
    for (int r = 0; r < kRows; ++r) {
      uint32_t pair;
      std::memcpy(&pair, xb + r * dp + 2 * p, sizeof pair);
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      for (int v = 0; v < NV; ++v) {
        a[r][v] = _mm512_dpbf16_ps(a[r][v], xv, (__m512bh)hv[v]);
        l[r][v] = _mm512_dpbf16_ps(l[r][v], xv, (__m512bh)lv[v]);
      }
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(acc + r * jp + j0 + 16 * v, _mm512_add_ps(a[r][v], l[r][v]));
}

__attribute__((target("avx512f,avx512bf16"))) void project_tile_bf16(const uint16_t* xb, int64_t dp,
                                                                     const uint16_t* whi, const uint16_t* wlo,
                                                                     const float* bias, int64_t jp, float* acc) {
  int64_t j0 = 0;
  for (; j0 + 32 <= jp; j0 += 32) project_block_bf16<2>(xb, dp, whi, wlo, bias, jp, j0, acc);
  if (j0 < jp) project_block_bf16<1>(xb, dp, whi, wlo, bias, jp, j0, acc);  // jp is a multiple of 16 here
}
#endif

// LELP_FAST_CPU_ISA=portable forces the portable loop (used by the tests); =avx2 keeps AVX2 but
// not the AVX512-BF16 path of bf16 embeddings.
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

bool pick_bf16_dot() {
#ifdef LELP_HAVE_AVX2_KERNEL
  const char* isa = std::getenv("LELP_FAST_CPU_ISA");
  if (isa != nullptr && (std::strcmp(isa, "portable") == 0 || std::strcmp(isa, "avx2") == 0)) return false;
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

bool use_bf16_dot() {
  static const bool yes = pick_bf16_dot();
  return yes;
}

// Whether this call's bf16 embeddings take the vdpbf16ps projection.
bool bf16_dot_takes(const TargetsArgs& a) { return a.emb_dtype == kBFloat16 && use_bf16_dot(); }

}  // namespace

const char* cpu_isa() { return pick_project_tile() == project_tile_portable ? "portable" : "avx2"; }

const char* targets_bf16_isa() { return use_bf16_dot() ? "avx512bf16" : cpu_isa(); }

TargetsWorkspace::TargetsWorkspace(const TargetsArgs& a)
    : jp(bf16_dot_takes(a) ? (a.J + 15) / 16 * 16 : (a.J + kPad - 1) / kPad * kPad),
      weight(a.d * jp, 0.f),
      bias(jp, 0.f),
      x(kRows * a.d, 0.f),
      acc(kRows * jp),
      z(a.C) {
  // Weight and bias padded with zero columns to a multiple of kPad (16 for the bf16 path; tiny: d x jp).
  for (int64_t k = 0; k < a.d; ++k) std::copy(a.weight + k * a.J, a.weight + (k + 1) * a.J, &weight[k * jp]);
  std::copy(a.bias, a.bias + a.J, bias.begin());
  if (!bf16_dot_takes(a)) return;
  // The map split into bf16 hi + lo, k-pairs interleaved per column (zero rows pad d to even).
  const int64_t dp = (a.d + 1) / 2 * 2;
  w_hi.assign(dp * jp, 0);
  w_lo.assign(dp * jp, 0);
  xb.assign(kRows * dp, 0);
  for (int64_t k = 0; k < a.d; ++k)
    for (int64_t j = 0; j < jp; ++j) {
      const float w = weight[k * jp + j];
      const uint16_t hi = float_to_bf16_bits(w);
      const int64_t at = ((k / 2) * jp + j) * 2 + (k % 2);
      w_hi[at] = hi;
      w_lo[at] = float_to_bf16_bits(w - bf16_bits_to_float(hi));
    }
}

int64_t targets_tile_rows() { return kRows; }

// Projections of rows [r0, r0 + rows) of bf16 embeddings into ws.acc by the vdpbf16ps kernel.
void project_tile_bf16_rows(const TargetsArgs& a, int64_t r0, int64_t rows, TargetsWorkspace& ws) {
#ifdef LELP_HAVE_AVX2_KERNEL
  const int64_t dp = (a.d + 1) / 2 * 2;
  const char* emb = static_cast<const char*>(a.embeddings);
  for (int64_t r = 0; r < kRows; ++r) {
    uint16_t* dst = &ws.xb[r * dp];
    if (r < rows)
      std::memcpy(dst, emb + (r0 + r) * a.emb_stride * 2, a.d * 2);
    else
      std::fill(dst, dst + a.d, uint16_t{0});
  }
  project_tile_bf16(ws.xb.data(), dp, ws.w_hi.data(), ws.w_lo.data(), ws.bias.data(), ws.jp, ws.acc.data());
#else
  (void)a, (void)r0, (void)rows, (void)ws;
#endif
}

// Inlined into a generic and an AVX2/FMA/F16C build (conversions and row math vectorise there).
__attribute__((always_inline)) inline void targets_tile_impl(const TargetsArgs& a, int64_t r0, TargetsWorkspace& ws,
                                                             float* log_t, ProjectTileFn project_tile) {
  const int64_t K = a.C * a.S;
  const int64_t rows = std::min(kRows, a.n - r0);
  const char* emb = static_cast<const char*>(a.embeddings);
  const int64_t emb_row_bytes = a.emb_stride * cpu::dtype_size(a.emb_dtype);
  if (project_tile == nullptr) {  // bf16 embeddings, AVX512-BF16: rows copied as they are (d padded to even)
    project_tile_bf16_rows(a, r0, rows, ws);
  } else {
    for (int64_t r = 0; r < rows; ++r)
      cpu::load_row(emb + (r0 + r) * emb_row_bytes, a.emb_dtype, a.d, &ws.x[r * a.d]);
    project_tile(ws.x.data(), a.d, ws.weight.data(), ws.bias.data(), ws.jp, ws.acc.data());
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = r0 + r;
    float* u = &ws.acc[r * ws.jp];
    float* zr = u + K;  // class logits from the head follow the K projections (the row math shifts them)
    if (a.logits != nullptr) {
      const char* lp =
          static_cast<const char*>(a.logits) + row * a.logits_stride * cpu::dtype_size(a.logits_dtype);
      cpu::load_row(lp, a.logits_dtype, a.C, ws.z.data());
      zr = ws.z.data();
    }
    if (a.nonfinite != nullptr) {
      // A NaN/Inf embedding makes every projection NaN or Inf (0 * Inf is NaN too), so J sums
      // flag the row; the caller re-checks flagged rows exactly (a sum can also overflow). A -inf
      // projection from a -inf bias (a subclass given target 0, e.g. a class with fewer subclasses)
      // is left out; any other value of such a column (NaN, +inf) still flags the row.
      float sum = 0.f;
      for (int64_t j = 0; j < a.J; ++j) sum += (ws.bias[j] == -INFINITY && u[j] == -INFINITY) ? 0.f : u[j];
      if (a.logits != nullptr)
        for (int64_t c = 0; c < a.C; ++c) sum += zr[c];
      a.nonfinite[row] = !std::isfinite(sum);
    }
    row_log_targets(u, zr, static_cast<int>(a.C), static_cast<int>(a.S), a.inv_beta, a.inv_tau,
                    log_t + r * K);
  }
}

#ifdef LELP_HAVE_AVX2_KERNEL
// The row math after the bf16 projection, built for AVX-512 (project_tile == nullptr selects it).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c"))) void targets_tile_bf16(
    const TargetsArgs& a, int64_t r0, TargetsWorkspace& ws, float* log_t) {
  targets_tile_impl(a, r0, ws, log_t, nullptr);
}

__attribute__((target("avx2,fma,f16c"))) void targets_tile_avx2(const TargetsArgs& a, int64_t r0,
                                                                TargetsWorkspace& ws, float* log_t) {
  targets_tile_impl(a, r0, ws, log_t, project_tile_avx2);
}
#endif

void targets_tile(const TargetsArgs& a, int64_t r0, TargetsWorkspace& ws, float* log_t) {
  static const ProjectTileFn project_tile = pick_project_tile();
#ifdef LELP_HAVE_AVX2_KERNEL
  if (!ws.w_hi.empty()) return targets_tile_bf16(a, r0, ws, log_t);
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
