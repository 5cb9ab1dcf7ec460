// Per-chunk fit update, the part BLAS cannot do (docs/algorithm.md, streaming fit): a stable
// counting sort of the rows by class, fp16/bf16/fp32 -> fp32 conversion, the
// class shift, per-class sums and the NaN/Inf check, in one pass over the chunk.
// The Gram / sketch GEMMs that follow run in BLAS.
#include "gather.h"

#include <omp.h>

#include <cstring>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "convert.h"

namespace lelp {

namespace {

// One row: out = convert(src) - shift; sum += out (fp64); returns whether any value is NaN/Inf
// (x * 0 is 0 for finite x and NaN otherwise, so the check rides along).
inline bool shift_row_portable(const char* src, int dtype, int64_t d, const float* shift, float* out, double* sum) {
  cpu::load_row(src, dtype, d, out);
  float probe = 0.f;
  LELP_SIMD_SUM(probe)
  for (int64_t k = 0; k < d; ++k) {
    out[k] -= shift[k];
    probe += out[k] * 0.f;
    sum[k] += out[k];
  }
  return probe != 0.f;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LELP_HAVE_AVX2_ROW 1
// The same with AVX2 + F16C, 8 values at a time: the portable loop above stays scalar in a
// baseline x86-64 build, and this pass is the only compiled work of the fit's update.
template <int kDtype>
__attribute__((target("avx2,f16c"))) inline __m256 load8(const char* src, int64_t k) {
  if (kDtype == kFloat32) return _mm256_loadu_ps(reinterpret_cast<const float*>(src) + k);
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(reinterpret_cast<const uint16_t*>(src) + k));
  if (kDtype == kFloat16) return _mm256_cvtph_ps(bits);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));  // bf16: the high half
}

template <int kDtype>
__attribute__((target("avx2,f16c"))) bool shift_row_avx2(const char* src, int64_t d, const float* shift, float* out,
                                                          double* sum) {
  const __m256 zero = _mm256_setzero_ps();
  __m256 probe = zero;
  int64_t k = 0;
  for (; k + 8 <= d; k += 8) {
    const __m256 v = _mm256_sub_ps(load8<kDtype>(src, k), _mm256_loadu_ps(shift + k));
    _mm256_storeu_ps(out + k, v);
    probe = _mm256_add_ps(probe, _mm256_mul_ps(v, zero));
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    _mm256_storeu_pd(sum + k, _mm256_add_pd(_mm256_loadu_pd(sum + k), lo));
    _mm256_storeu_pd(sum + k + 4, _mm256_add_pd(_mm256_loadu_pd(sum + k + 4), hi));
  }
  // probe lanes are 0 or NaN: NaN compares unequal to itself.
  bool bad = _mm256_movemask_ps(_mm256_cmp_ps(probe, probe, _CMP_UNORD_Q)) != 0;
  if (k < d) {
    const int64_t offset = k * cpu::dtype_size(kDtype);
    bad |= shift_row_portable(src + offset, kDtype, d - k, shift + k, out + k, sum + k);
  }
  return bad;
}

bool have_avx2_f16c() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return ok;
}
#endif

using ShiftRow = bool (*)(const char*, int64_t, const float*, float*, double*);

template <int kDtype>
bool shift_row_generic(const char* src, int64_t d, const float* shift, float* out, double* sum) {
  return shift_row_portable(src, kDtype, d, shift, out, sum);
}

ShiftRow pick_shift_row(int dtype) {
#ifdef LELP_HAVE_AVX2_ROW
  if (have_avx2_f16c()) {
    if (dtype == kFloat32) return shift_row_avx2<kFloat32>;
    if (dtype == kFloat16) return shift_row_avx2<kFloat16>;
    return shift_row_avx2<kBFloat16>;
  }
#endif
  if (dtype == kFloat32) return shift_row_generic<kFloat32>;
  if (dtype == kFloat16) return shift_row_generic<kFloat16>;
  return shift_row_generic<kBFloat16>;
}

}  // namespace

int64_t bucket_rows_cpu(const BucketArgs& a) {
  const int64_t C = a.num_classes, d = a.d;
  // Stable destinations: class offsets, then each row's rank within its class.
  std::vector<int64_t> next(C, 0), dest(a.n);
  for (int64_t i = 0; i < a.n; ++i) {
    const int64_t c = a.labels[i];
    if (c < 0 || c >= C) return -(i + 1);
    ++next[c];
  }
  int64_t offset = 0;
  for (int64_t c = 0; c < C; ++c) {
    a.counts[c] = next[c];
    const int64_t n_c = next[c];
    next[c] = offset;
    offset += n_c;
  }
  for (int64_t i = 0; i < a.n; ++i) dest[i] = next[a.labels[i]]++;

  const int64_t row_bytes = a.src_stride * cpu::dtype_size(a.src_dtype);
  const char* src = static_cast<const char*>(a.src);
  const ShiftRow shift_row = pick_shift_row(a.src_dtype);
  const int threads = omp_get_max_threads();
  // Per-thread fp64 sums, reduced in thread order so the result is deterministic.
  std::vector<double> partial(static_cast<size_t>(threads) * C * d, 0.0);
  int64_t bad_rows = 0;
#pragma omp parallel num_threads(threads) reduction(+ : bad_rows)
  {
    double* my_sums = partial.data() + static_cast<size_t>(omp_get_thread_num()) * C * d;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < a.n; ++i) {
      const int64_t c = a.labels[i];
      const bool bad = shift_row(src + i * row_bytes, d, a.shift + c * d, a.out + dest[i] * d, my_sums + c * d);
      a.nonfinite[i] = bad ? 1 : 0;
      bad_rows += bad ? 1 : 0;
    }
  }
  std::memset(a.sums, 0, sizeof(double) * C * d);
  for (int t = 0; t < threads; ++t) {
    const double* p = partial.data() + static_cast<size_t>(t) * C * d;
    for (int64_t k = 0; k < C * d; ++k) a.sums[k] += p[k];
  }
  return bad_rows;
}

}  // namespace lelp
