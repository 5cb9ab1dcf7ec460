// Per-chunk fit update, the part BLAS cannot do: gather rows in class order,
// convert fp16/bf16/fp32 to fp32 and subtract each row's class shift, in one
// pass over the chunk. The Gram / sketch GEMMs that follow run in torch (MKL).
#include "gather.h"

#include <cstring>
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

int64_t gather_rows_cpu(const GatherArgs& a) {
  const int64_t row_bytes = a.src_stride * cpu::dtype_size(a.src_dtype);
  const char* src = static_cast<const char*>(a.src);
  const bool f16c = a.src_dtype == kFloat16 && have_f16c();
  int64_t bad_rows = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad_rows)
  for (int64_t i = 0; i < a.n; ++i) {
    const int64_t row = a.index != nullptr ? a.index[i] : i;
    const char* p = src + row * row_bytes;
    float* out = a.out + i * a.d;
#ifdef LELP_HAVE_F16C_KERNEL
    if (f16c)
      half_row_f16c(reinterpret_cast<const uint16_t*>(p), a.d, out);
    else
#endif
      cpu::load_row(p, a.src_dtype, a.d, out);
    if (a.shift != nullptr) {
      const float* s = a.shift + (a.row_class != nullptr ? a.row_class[i] : 0) * a.d;
      for (int64_t k = 0; k < a.d; ++k) out[k] -= s[k];
    }
    // x * 0 is 0 for finite x and NaN for NaN/Inf: one vectorisable pass over the row.
    float probe = 0.f;
    for (int64_t k = 0; k < a.d; ++k) probe += out[k] * 0.f;
    const bool bad = probe != 0.f;
    if (a.nonfinite != nullptr) a.nonfinite[i] = bad ? 1 : 0;
    bad_rows += bad ? 1 : 0;
  }
  return bad_rows;
}

}  // namespace lelp
