// Per-chunk fit update, the part BLAS cannot do (DESIGN.md §2): a stable
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

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LELP_HAVE_F16C_KERNEL 1
// fp16 -> fp32 with the F16C instruction, 8 values at a time.
__attribute__((target("avx2,f16c"))) void half_row_f16c(const uint16_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = cpu::half_bits_to_float(src[i]);
}
#endif

bool have_f16c() {
#ifdef LELP_HAVE_F16C_KERNEL
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
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
  const bool f16c = a.src_dtype == kFloat16 && have_f16c();
  const int threads = omp_get_max_threads();
  // Per-thread fp64 sums, reduced in thread order so the result is deterministic.
  std::vector<double> partial(static_cast<size_t>(threads) * C * d, 0.0);
  int64_t bad_rows = 0;
#pragma omp parallel num_threads(threads) reduction(+ : bad_rows)
  {
    double* my_sums = partial.data() + static_cast<size_t>(omp_get_thread_num()) * C * d;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < a.n; ++i) {
      const char* p = src + i * row_bytes;
      float* out = a.out + dest[i] * d;
#ifdef LELP_HAVE_F16C_KERNEL
      if (f16c)
        half_row_f16c(reinterpret_cast<const uint16_t*>(p), d, out);
      else
#endif
        cpu::load_row(p, a.src_dtype, d, out);
      const float* s = a.shift + a.labels[i] * d;
      double* sum = my_sums + a.labels[i] * d;
      // x * 0 is 0 for finite x and NaN for NaN/Inf: the check rides along for free.
      float probe = 0.f;
      for (int64_t k = 0; k < d; ++k) {
        out[k] -= s[k];
        probe += out[k] * 0.f;
        sum[k] += out[k];
      }
      const bool bad = probe != 0.f;
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
