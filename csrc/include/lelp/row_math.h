// Row math shared by the CPU and CUDA kernels: written once, used twice.
//
// One row of LELP targets (docs/algorithm.md):
//   log t[c*S+s] = log_softmax(z / tau)[c] + log_softmax_s(u[c, :] / beta)[s]
// All arithmetic is fp32, whatever the storage dtype of the inputs.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LELP_HD __host__ __device__ __forceinline__
#include <math.h>
// Device loops over a run-time count of a class's values: not unrolled (the CUDA tile runs them once
// per row; tests/cuda_targets_cost.py counts a loop's body once per trip). The CPU loops vectorise.
#define LELP_DEVICE_UNROLL_1 _Pragma("unroll 1")
#else
// always_inline: the CPU kernels inline this math into an AVX2/FMA-targeted and a generic
// function; only inlined code is compiled (and vectorised) for the caller's target.
#define LELP_HD __attribute__((always_inline)) inline
#include <cmath>
#define LELP_DEVICE_UNROLL_1
#endif

// Per-row reductions over short rows (K = 16) are the loss's bottleneck when compiled as serial
// dependency chains: without -ffast-math GCC keeps float sums in order. These let the CPU build
// vectorise them (reassociated, deterministic for a given build); no-ops elsewhere.
#if defined(_OPENMP) && !defined(__CUDA_ARCH__)
#define LELP_PRAGMA(x) _Pragma(#x)
#define LELP_SIMD_SUM(var) LELP_PRAGMA(omp simd reduction(+ : var))
#define LELP_SIMD_MAX(var) LELP_PRAGMA(omp simd reduction(max : var))
#else
#define LELP_SIMD_SUM(var)
#define LELP_SIMD_MAX(var)
#endif

namespace lelp {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

LELP_HD float fmax_(float a, float b) { return a > b ? a : b; }

// (x - m) * scale (scale = 1 / tau, or log2(e) / tau) without an intermediate that overflows where the
// result is finite: at scale <= 1, x * scale and m * scale cannot overflow, while x - m can (a row
// spanning more than FLT_MAX); at scale > 1, x * scale can, and x - m overflows only where the result
// would too.
LELP_HD float scaled_gap(float x, float m, float scale) {
  if (scale > 1.f) return (x - m) * scale;
  // x * scale - m * scale is contracted to fma(x, scale, -(m * scale)) (g++ -O3; nvcc: an FFMA on
  // sm_90), which for x = m is m * scale's rounding error, not 0 (-142 at m = 1e10, tau = 1.5: exp
  // gave 0 and the row's sum of q 0, the loss -inf or NaN)
#if defined(__CUDA_ARCH__)
  return __fmul_rn(x, scale) - __fmul_rn(m, scale);  // products rounded alike: 0 at x = m
#else
  return x == m ? 0.f : x * scale - m * scale;
#endif
}

// 2^x and log2(x) in the GPU's one-instruction forms (ex2/lg2.approx.ftz: about 2 ulp, results and
// arguments below 2^-126 flushed to 0), as the Triton kernels take them; exp2f/log2f on the host.
// The CUDA loss feeds them pre-scaled arguments (x log2(e)), so an exponential is one MUFU op
// where expf is about eight instructions.
constexpr float kLog2e = 1.44269504088896341f, kLn2 = 0.693147180559945309f;

LELP_HD float exp2_approx(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

// 1/x as rcp.approx.ftz (1 ulp; one MUFU op where a division is about ten instructions).
LELP_HD float rcp_approx(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return 1.f / x;
#endif
}

LELP_HD float log2_approx(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return log2f(x);
#endif
}

// exp for the CPU loops: a branch-free Cephes-style polynomial that GCC vectorises (libm's expf
// does not vectorise without -ffast-math, which would break the NaN/Inf handling). Relative error
// about 2e-7; exactly 0 below -87.3 (so 0 * log 0 stays 0) and +inf above 88.7. CUDA uses expf.
LELP_HD float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  const float xc = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  // Round to nearest by adding and subtracting 1.5 * 2^23: plain arithmetic, so it vectorises.
  const float n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  union { int32_t i; float f; } scale;
  scale.i = (static_cast<int32_t>(n) + 127) << 23;
  const float y = p * scale.f;
  return x < -87.3f ? 0.f : (x > 88.7f ? INFINITY : y);
#endif
}

// The targets' log-softmax exp and log: on the GPU a multiply and one MUFU op each (ex2/lg2.approx.ftz,
// as the Triton targets kernel takes them; their sums start at exp(0) = 1, so nothing flushed matters),
// where expf and logf took about 8 and 20 instructions; on the host fast_exp and logf, unchanged.
LELP_HD float softmax_exp(float x) {
#if defined(__CUDA_ARCH__)
  return exp2_approx(x * kLog2e);
#else
  return fast_exp(x);
#endif
}

LELP_HD float softmax_log(float x) {
#if defined(__CUDA_ARCH__)
  return log2_approx(x) * kLn2;
#else
  return logf(x);
#endif
}

// The class log-softmax's first half, in place: x[i * stride] (n class logits) becomes
// (x - max x) * scale, and the return is log(sum(exp(that))), so log p_c = x'[c] - return. The
// logits are shifted by their unscaled max before scaling (as subclass_log_softmax does), and the
// log-sum subtracted from the shifted value, not added to the max first: with m + log(sum) taken
// first a huge z / tau (1e4, or 1 / 1e-6) rounded the log-sum away (class probabilities summing to
// 1 +- 2e-3, log t > 0), and a finite z whose z / tau overflows float32 gave NaN.
LELP_HD float shift_class_logits(float* x, int n, int stride, float scale) {
  float m = -INFINITY;
  LELP_DEVICE_UNROLL_1
  for (int i = 0; i < n; ++i) m = fmax_(m, x[i * stride]);
  float acc = 0.f;
  LELP_DEVICE_UNROLL_1
  for (int i = 0; i < n; ++i) acc += softmax_exp(x[i * stride] = (x[i * stride] - m) * scale);  // stored, then summed
  return softmax_log(acc);
}

// out[s] = log_softmax(x * scale)[s] + offset over n values (x and out may alias). The values are
// shifted by their unscaled max before scaling, so with n = 1 (S = 1) the term is exactly 0 (and
// S = 1 is exactly vanilla KD) whatever the compiler contracts into FMAs; a NaN still propagates.
// The log-softmax comes first and the offset (log p_c) after: (log p_c + u/beta) - lse would
// cancel log p_c away when |u|/beta is huge (S = 1, u/beta = 1e6).
LELP_HD void subclass_log_softmax(const float* x, int n, float scale, float offset, float* out) {
  float m = -INFINITY;
  LELP_DEVICE_UNROLL_1
  for (int i = 0; i < n; ++i) m = fmax_(m, x[i]);
  float acc = 0.f;
  LELP_DEVICE_UNROLL_1
  for (int i = 0; i < n; ++i) acc += softmax_exp((x[i] - m) * scale);
  const float lse = softmax_log(acc);
  LELP_DEVICE_UNROLL_1
  for (int i = 0; i < n; ++i) out[i] = ((x[i] - m) * scale - lse) + offset;
}

// u: K = C*S subclass projections (class-major), z: C teacher class logits (overwritten: see
// shift_class_logits). Writes K log-targets (fp32) into out.
LELP_HD void row_log_targets(const float* u, float* z, int C, int S,
                             float inv_beta, float inv_tau, float* out) {
  const float log_sum = shift_class_logits(z, C, 1, inv_tau);
  for (int c = 0; c < C; ++c) subclass_log_softmax(u + c * S, S, inv_beta, z[c] - log_sum, out + c * S);
}

// bf16 <-> fp32 by bit manipulation (round to nearest even; NaN kept quiet).
LELP_HD float bf16_bits_to_float(uint16_t b) {
  union { uint32_t u; float f; } v;
  v.u = static_cast<uint32_t>(b) << 16;
  return v.f;
}

LELP_HD uint16_t float_to_bf16_bits(float f) {
  union { uint32_t u; float f; } v;
  v.f = f;
  if ((v.u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((v.u >> 16) | 0x40u);
  const uint32_t rounding = 0x7fffu + ((v.u >> 16) & 1u);
  return static_cast<uint16_t>((v.u + rounding) >> 16);
}

}  // namespace lelp
