// The CUDA loss kernel's body: a group of W lanes per row (W = 1 ... 32, so 32 / W rows per warp),
// each lane holding CH chunks of V consecutive elements of its row in registers, reductions as
// butterflies over the group. V is 4 (16-byte loads), or 5 where classes of S = 5 2^j take the
// class-wise work (chunk_width). A lane holds up to 4 chunks before a row takes more lanes
// (loss_shape): K = 16 is one lane a row, 32 rows a warp; K = 512 is 32 lanes of 16 values.
//
// Written against a Warp type instead of CUDA intrinsics: csrc/cuda/warp.cuh supplies shuffles and
// 16-byte loads on the GPU; tests/cuda_emu/ supplies 32 host threads and a barrier, so the kernel's
// indexing and numerics are tested against the fp64 reference on a CPU. A Warp provides
//   kWidth (W), lane() (0..31), sum(v) / max(v) over the lane's group, sum_within(v, n) over aligned
//   runs of n of its lanes, xor_lane(v, o) / from_lane(v, l) (lane ^ o's v, lane l's v), any(p) over
//   the warp, sync() (a warp barrier with memory ordering), and
//   static load(p, dtype, i), load4(p, dtype, i, v), store(p, dtype, i, v), store4(p, dtype, i, v).
// The math is that of lelp/loss_math.h (docs/algorithm.md).
#pragma once

#include <stdexcept>
#include <type_traits>

#include "cpu/loss.h"
#include "lelp/loss_math.h"

#if defined(__CUDACC__)
#define LELP_DEV __device__ __forceinline__
#else
#define LELP_DEV inline
#endif

namespace lelp {
namespace warp {

constexpr int kVec = 4;  // elements per chunk: one 16-byte fp32 load, 8 bytes in bf16/fp16
// Elements per chunk where classes of S = 5 2^j subclasses take the class-wise work (chunk_width):
// each chunk part of one class, a class a power-of-two number of them, loaded element by element.
constexpr int kClassVec = 5;
constexpr int kMaxClassVecChunks = 32;  // chunks of 5 a row at most (the layouts compiled: W <= 8)
constexpr int kMaxOnlineTeachers = 8;

// The online teachers' projections, passed by value as a kernel parameter (m = 0: precomputed).
struct OnlineTeachers {
  TargetsArgs t[kMaxOnlineTeachers];
  int m;
};

// Floats of shared memory one row needs for online targets: its K + C projections.
LELP_HD int64_t online_row_floats(int64_t C, int64_t S) { return C * S + C; }

// The row element that slot i of lane g holds: chunk i / V of the lane, chunks of a group interleaved
// so that each load instruction of the group reads one contiguous span of the row.
template <int W, int V>
LELP_DEV int element(int g, int i) {
  return ((i / V) * W + g) * V + i % V;
}

// Loads the lane's V * CH elements of one row starting at `base` (absent elements get `fill`).
// V = 4: vec, the row start is 16-byte aligned for fp32 (8 for 16-bit) and K % 4 == 0. V = 5 loads
// element by element, and a chunk is whole or past the end (K % 5 == 0: chunk_width).
template <class Warp, int CH, int V>
LELP_DEV void load_row(const void* p, int dtype, int64_t base, int K, int g, bool vec, float fill, float* v) {
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    const int k0 = (c * Warp::kWidth + g) * V;
    if constexpr (V == kVec) {
      if (vec) {  // K % 4 == 0: a chunk is whole or past the end
        if (k0 < K) {
          Warp::load4(p, dtype, base + k0, v + c * V);
        } else {
#pragma unroll
          for (int e = 0; e < V; ++e) v[c * V + e] = fill;
        }
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) v[c * V + e] = k0 + e < K ? Warp::load(p, dtype, base + k0 + e) : fill;
      }
    } else {
      const bool whole = k0 < K;
#pragma unroll
      for (int e = 0; e < V; ++e) v[c * V + e] = whole ? Warp::load(p, dtype, base + k0 + e) : fill;
    }
  }
}

// The segmented log-softmaxes of one row, in place, by the row's group: u[0, K) holds the K
// projections and becomes log t, u[K, K + C) holds the class logits (docs/algorithm.md; the order of
// operations is lelp::row_log_targets'). Every lane of the warp must call it (it synchronises).
template <class Warp>
LELP_DEV void group_log_targets(const Warp& w, float* u, int C, int S, float inv_beta, float inv_tau) {
  constexpr int W = Warp::kWidth;
  const int g = w.lane() % W, K = C * S;
  float* z = u + K;  // shifted in place, each lane its own classes (lelp::shift_class_logits)
  float m = -INFINITY;
  for (int c = g; c < C; c += W) m = fmax_(m, z[c]);
  m = w.max(m);
  float sum = 0.f;
  for (int c = g; c < C; c += W) {
    z[c] = (z[c] - m) * inv_tau;
    sum += expf(z[c]);
  }
  const float log_sum = logf(w.sum(sum));
  for (int c = g; c < C; c += W) subclass_log_softmax(u + c * S, S, inv_beta, z[c] - log_sum, u + c * S);
  w.sync();
}

// One row of log-targets from a teacher's embeddings, computed by the row's group into u (K + C
// floats of shared memory): u = h [A | W^T] + [e | b], then the log-softmaxes. Every lane of the
// warp must call it (it synchronises).
template <class Warp>
LELP_DEV void group_row_targets(const Warp& w, const TargetsArgs& t, int64_t row, int C, int S, float* u) {
  constexpr int W = Warp::kWidth;
  const int g = w.lane() % W, K = C * S, J = static_cast<int>(t.J);
  for (int j = g; j < J; j += W) {
    float acc = t.bias[j];
    for (int64_t k = 0; k < t.d; ++k)
      acc += Warp::load(t.embeddings, t.emb_dtype, row * t.emb_stride + k) * t.weight[k * J + j];
    u[j] = acc;
  }
  if (t.logits != nullptr)
    for (int c = g; c < C; c += W) u[K + c] = Warp::load(t.logits, t.logits_dtype, row * t.logits_stride + c);
  w.sync();
  group_log_targets(w, u, C, S, t.inv_beta, t.inv_tau);
}

// The lane's log-targets of one row: precomputed (one teacher, or M mixed by the row's weights) or
// online (u: the row's shared-memory scratch). Absent elements get -inf.
template <class Warp, int CH, int V>
LELP_DEV void lane_log_targets(const Warp& w, const LossArgs& a, const OnlineTeachers& online, float* u, int64_t row,
                               bool vec, float* lt) {
  constexpr int W = Warp::kWidth, P = CH * V;
  const int g = w.lane() % W, C = static_cast<int>(a.C), S = static_cast<int>(a.S), K = C * S;
  if constexpr (V != kVec) {  // chunks of 5 take one precomputed teacher (chunk_width)
    load_row<Warp, CH, V>(a.log_targets, a.targets_dtype, row * a.targets_stride, K, g, vec, -INFINITY, lt);
    return;
  }
  const bool mixed = a.weights != nullptr;
#pragma unroll
  for (int i = 0; i < P; ++i) lt[i] = -INFINITY;
  if (online.m > 0) {
    for (int m = 0; m < online.m; ++m) {  // warp-uniform: group_row_targets synchronises
      const float wt = mixed ? a.weights[row * a.n_teachers + m] : 1.f;
      group_row_targets(w, online.t[m], row, C, S, u);
      if (wt != 0.f) {  // NaN or negative weights give NaN, never a finite loss
        const float log_w = logf(wt);
#pragma unroll
        for (int i = 0; i < P; ++i) {
          const int k = element<W, V>(g, i);
          const float v = k < K ? u[k] : -INFINITY;
          lt[i] = mixed ? logaddexp_(lt[i], log_w + v) : v;
        }
      }
      w.sync();  // the next teacher overwrites u
    }
    return;
  }
  const int64_t base = row * a.targets_stride;
  if (!mixed) {
    load_row<Warp, CH, V>(a.log_targets, a.targets_dtype, base, K, g, vec, -INFINITY, lt);
    return;
  }
  float v[P];
  for (int64_t m = 0; m < a.n_teachers; ++m) {
    const float wt = a.weights[row * a.n_teachers + m];
    if (wt == 0.f) continue;
    const float log_w = logf(wt);
    load_row<Warp, CH, V>(a.log_targets, a.targets_dtype, base + m * K, K, g, vec, -INFINITY, v);
#pragma unroll
    for (int i = 0; i < P; ++i) lt[i] = logaddexp_(lt[i], log_w + v[i]);
  }
}

// Whether the loss takes the subclass weight lambda (KL only, S > 1): then each row needs
// loss_row_scratch_floats of shared memory for its class sums.
LELP_HD bool subclass_weighted(const LossArgs& a) {
  return a.divergence == kKL && a.subclass_weight != 1.f && a.S > 1;
}

// Floats of shared memory one row of the loss needs: the online teachers' projections (K + C), or
// the class sums' three rows of K (row_class_kl_exact; row_class_kl's 4 ceil(K / 4) + C + 1 fit in
// them since S >= 2), whichever is more; 0 if neither.
LELP_HD int64_t loss_row_scratch_floats(const LossArgs& a, bool online) {
  const int64_t need = subclass_weighted(a) ? 3 * a.C * a.S : 0;
  return online ? (need > online_row_floats(a.C, a.S) ? need : online_row_floats(a.C, a.S)) : need;
}

// Class c's divergence term p (log p - log Q_c) of the weighted KL, from its sums p (of t) and q (of
// qu, in any scale; inv_q = 1 / q, log2_sum: log2 of the row's sum of qu in the same scale), so that
// Q_c = q / sum. p / q is kept from 2^-126 (lg2.approx.ftz's argument): where that acts p < 2^-117 and
// the term changes by less than 1e-34.
LELP_DEV float class_divergence(float p, float inv_q, float log2_sum) {
  const float ratio = p * inv_q;
  return p == 0.f ? 0.f : p * kLn2 * (log2_approx(ratio < 0x1p-126f ? 0x1p-126f : ratio) + log2_sum);
}

// class_divergence with the rest of log(p / Q_c) given in natural units (ln_rest = ln of the row's sum
// minus the class max's offset (m_c - max) / tau): its log2 form overflows for offsets past
// FLT_MAX / log2(e).
LELP_DEV float class_divergence_ln(float p, float inv_q, float ln_rest) {
  const float ratio = p * inv_q;
  return p == 0.f ? 0.f : p * (kLn2 * log2_approx(ratio < 0x1p-126f ? 0x1p-126f : ratio) + ln_rest);
}

// row_class_kl with every class summed from its own max m_c (log2_sum: log2 of the row's sum of
// qu = 2^((s - mx) scale2)): exact when a class holds less than 2^-90 of the row's q. The class's
// exponentials are 2^((s - m_c) scale2), from s itself: (s - mx) keeps only ulp(mx - s) of the
// differences within a class far below mx. The lanes write t and s to the row's scratch u (3K
// floats); lane g takes classes g, g + W, ..., and each lane reads its slots' gradient back. Every
// lane of the warp must call it.
template <class Warp, int CH, int V>
LELP_DEV float row_class_kl_exact(const Warp& w, const LossArgs& a, const float* s, float scale2, float mx,
                                  float log2_sum, const float* qu, const float* t, float* u, float* gr) {
  constexpr int W = Warp::kWidth, P = CH * V;
  const int g = w.lane() % W, C = static_cast<int>(a.C), S = static_cast<int>(a.S), K = C * S;
  float *uq = u, *ut = u + K, *ux = u + 2 * K;
  w.sync();  // the caller's reads of u are done
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const int k = element<W, V>(g, i);
    if (k < K) {
      ut[k] = t[i];
      ux[k] = s[i];
    }
  }
  w.sync();
  const float f = (1.f - a.subclass_weight) * a.tau, inv_tau = 1.f / a.tau, log_sum = kLn2 * log2_sum;
  float d = 0.f;
  for (int c = g; c < C; c += W) {
    float p = 0.f, m = -INFINITY, acc = 0.f;
    for (int j = c * S; j < (c + 1) * S; ++j) {
      p += ut[j];
      m = fmax_(m, ux[j]);
    }
    for (int j = c * S; j < (c + 1) * S; ++j) {
      uq[j] = m == -INFINITY ? 0.f : exp2_approx(scaled_gap(ux[j], m, scale2));  // a class of -inf logits: q = 0
      acc += uq[j];
    }
    const float inv_q = rcp_approx(acc), r = p == 0.f ? 0.f : f * p * inv_q;  // sums in the scale of the class max
    for (int j = c * S; j < (c + 1) * S; ++j) uq[j] *= r;
    d += class_divergence_ln(p, inv_q, log_sum - scaled_gap(m, mx, inv_tau));
  }
  w.sync();
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const int k = element<W, V>(g, i);
    if (k < K) gr[i] -= uq[k];
  }
  w.sync();  // the next row overwrites u
  return w.sum(d);
}

// KL(p||Q) of one row, p_c and Q_c the class sums of t and q, for the subclass weight lambda
// (lelp/loss_math.h, kl_row_subclass_weighted); adds the class term's gradient
// -(1 - lambda) tau p_c q_k / Q_c to gr; for any S (row_class_kl_chunked takes classes of whole
// chunks in registers). A chunk of 4 holds the end of one class and the start of the next at most
// (S >= 2): each lane splits its chunks' sums of t and qu at the class boundary and writes the four
// parts to the row's scratch u; lane g then sums classes g, g + W, ... from their chunks' parts and
// writes each class's gradient factor r_c = (1 - lambda) tau p_c / q_c; each lane reads the factors
// of its chunks' two classes back. If a class of the warp holds less than 2^-90 of its row's q, the
// warp sums every class exactly instead (row_class_kl_exact).
template <class Warp, int CH, int V>
LELP_DEV float row_class_kl(const Warp& w, const LossArgs& a, const float* s, float scale2, float mx, float log2_sum,
                            const float* qu, const float* t, float* u, float* gr) {
  static_assert(V == kVec, "chunks of 5 hold whole classes (row_class_kl_chunked)");
  constexpr int W = Warp::kWidth;
  const int g = w.lane() % W, C = static_cast<int>(a.C), S = static_cast<int>(a.S), K = C * S;
  const float inv_s = 1.f / static_cast<float>(S);
  float* part = u;                               // per chunk: p of its first class, of its second, q likewise
  float* fac = u + 4 * ((K + kVec - 1) / kVec);  // per class, and a 0 after the last
  int first[CH], split[CH];  // per slot: its chunk's first class, and how many of its 4 elements are in it
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    const int j = c * W + g, k0 = j * kVec;
    first[c] = static_cast<int>((static_cast<float>(k0) + 0.5f) * inv_s);  // k0 / S, exact (K <= 512)
    split[c] = (first[c] + 1) * S - k0;
    float p1 = 0.f, p2 = 0.f, q1 = 0.f, q2 = 0.f;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const bool in_first = e < split[c];
      p1 += in_first ? t[c * kVec + e] : 0.f;
      p2 += in_first ? 0.f : t[c * kVec + e];
      q1 += in_first ? qu[c * kVec + e] : 0.f;
      q2 += in_first ? 0.f : qu[c * kVec + e];
    }
    if (k0 < K) {
      part[4 * j] = p1;
      part[4 * j + 1] = p2;
      part[4 * j + 2] = q1;
      part[4 * j + 3] = q2;
    }
  }
  if (g == 0) fac[C] = 0.f;
  w.sync();
  const float f = (1.f - a.subclass_weight) * a.tau;
  float d = 0.f;
  bool inexact = false;
#pragma unroll 1
  for (int c = g; c < C; c += W) {
    const int j0 = (c * S) >> 2, j1 = (c * S + S - 1) >> 2, second = 4 * j0 < c * S;  // j0 starts in c - 1
    float p = part[4 * j0 + second], q = part[4 * j0 + 2 + second];
#pragma unroll 1
    for (int j = j0 + 1; j <= j1; ++j) {  // chunks that start in class c
      p += part[4 * j];
      q += part[4 * j + 2];
    }
    inexact = inexact || (p > 0.f && !(q >= 0x1p-90f));
    const float inv_q = rcp_approx(q);
    fac[c] = p == 0.f ? 0.f : f * p * inv_q;
    d += class_divergence(p, inv_q, log2_sum);
  }
  if (w.any(inexact)) return row_class_kl_exact<Warp, CH, V>(w, a, s, scale2, mx, log2_sum, qu, t, u, gr);
  w.sync();
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    if ((c * W + g) * kVec >= K) continue;
    const float r1 = fac[first[c]], r2 = fac[first[c] + 1];
#pragma unroll
    for (int e = 0; e < kVec; ++e) gr[c * kVec + e] -= (e < split[c] ? r1 : r2) * qu[c * kVec + e];
  }
  w.sync();  // the next row overwrites u
  return w.sum(d);
}

// Whether row_class_kl_chunked takes the rows: a class is a power-of-two number of whole chunks of V
// (S % V == 0, S / V a power of two), however the chunks were loaded.
LELP_HD bool classes_in_chunks(const LossArgs& a, int V) {
  const int64_t sc = a.S / V;
  return a.S % V == 0 && (sc & (sc - 1)) == 0;
}

// Which class-wise form a row takes (row_kl's class sums at lambda != 1, the hard-label term): by
// the row's shape (0), or always one of these (ClassSums): classes of whole chunks, a class's sums
// in registers by its slots (kChunks) or reduce-scattered over its run of lanes (kScattered), or any
// classes (kShared: the sums through shared memory, the hard-label term element by element). Only
// the cost model (tests/cuda_cost.py) forces one, so that it counts one form with S a runtime value,
// as the kernel has it.
enum ClassSums { kByShape = 0, kChunks = 1, kShared = 2, kScattered = 3 };

template <class Warp>
struct ClassSumsForm {
  static constexpr int value = kByShape;
};

// The form a row takes, by its shape or as ClassSumsForm forces: classes of whole chunks, reduce-
// scattered where a class is one slot of an aligned run of 8 or more of the group's lanes and each
// lane holds 4 chunks of 4 (class_factors_scattered), else by slots (class_factors_by_slot); other
// classes through shared memory (row_class_kl). Chunks of 5 hold whole classes (chunk_width).
template <class Warp, int CH, int V>
LELP_HD int class_sums_form(const LossArgs& a) {
  constexpr int forced = ClassSumsForm<Warp>::value;
  if (forced != kByShape) return forced;
  if (V != kVec) return kChunks;
  if (!classes_in_chunks(a, kVec)) return kShared;
  const int64_t sc = a.S / kVec;
  return CH == 4 && sc >= 8 && sc <= Warp::kWidth ? kScattered : kChunks;
}

// Whether the row's classes are whole chunks: row_kl then takes a lambda != 1 row's class sums in
// registers (row_class_kl_chunked), and loss_row the hard-label term a chunk at a time
// (row_hard_label_from_exp_chunks).
template <class Warp, int CH, int V>
LELP_HD bool classes_are_whole_chunks(const LossArgs& a) {
  return class_sums_form<Warp, CH, V>(a) != kShared;
}

// Per slot c of the lane, its class's gradient factor r[c] = (1 - lambda) tau p / q from its part of
// the class sums p[c] (of t) and q[c] (of qu), where a class is one slot of an aligned run of `run`
// lanes: each slot's sums a butterfly over the run; a class's first chunk adds its divergence term
// to *d. Returns whether a class of the lane has a share of qu below 2^-90.
template <class Warp, int CH, int V>
LELP_DEV bool class_factors_by_slot(const Warp& w, int K, int sc, int run, float f, float log2_sum, const float* p,
                                    const float* q, float* r, float* d) {
  constexpr int W = Warp::kWidth;
  const int g = w.lane() % W;
  bool inexact = false;
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    const float pc = w.sum_within(p[c], run), qc = w.sum_within(q[c], run);
    const int j = c * W + g;
    const float inv_q = rcp_approx(qc);
    r[c] = pc == 0.f ? 0.f : f * pc * inv_q;
    if (j * V < K && (j & (sc - 1)) == 0) {  // the class's first chunk
      *d += class_divergence(pc, inv_q, log2_sum);
      inexact = inexact || (pc > 0.f && !(qc >= 0x1p-90f));
    }
  }
  return inexact;
}

// class_factors_by_slot for 4 slots a lane and runs of 8 or more lanes (kScattered): the run's 8
// sums (p and q of 4 slots) are reduce-scattered, halved at each of 3 butterfly levels (offsets
// run / 2, / 4, / 8), so that each lane adds one of them over the remaining levels, and exchanges
// it with the lane run / 2 away (p with q). Each lane then has one class's p and q, computes its
// factor, and takes its 4 slots' factors from the lanes that hold them: 13-14 shuffles a lane where
// by slot takes 40 (32 lanes), one reciprocal instead of 4.
template <class Warp>
LELP_DEV bool class_factors_scattered(const Warp& w, int K, int run, float f, float log2_sum, const float* p,
                                      const float* q, float* r, float* d) {
  constexpr int W = Warp::kWidth;
  const int g = w.lane() % W, in_run = g & (run - 1), half = run / 2, quarter = run / 4, eighth = run / 8;
  float v[8] = {p[0], p[1], p[2], p[3], q[0], q[1], q[2], q[3]};
  // Level by level the lane keeps the half of its values whose index has its lane bit, and adds the
  // partner's part of them: after the three, value (q?, slot bits) = (in_run & half, & quarter, & eighth).
  const bool upper = in_run & half, mid = in_run & quarter, low = in_run & eighth;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float keep = upper ? v[i + 4] : v[i], give = upper ? v[i] : v[i + 4];
    v[i] = keep + w.xor_lane(give, half);
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float keep = mid ? v[i + 2] : v[i], give = mid ? v[i] : v[i + 2];
    v[i] = keep + w.xor_lane(give, quarter);
  }
  float total = (low ? v[1] : v[0]) + w.xor_lane(low ? v[0] : v[1], eighth);
#pragma unroll
  for (int o = W / 16; o > 0; o >>= 1) {  // over the lanes that hold the same value (offsets below run / 8)
    const float x = w.xor_lane(total, o);
    if (o < eighth) total += x;
  }
  const float other = w.xor_lane(total, half);
  const float pc = upper ? other : total, qc = upper ? total : other;
  const int slot = (mid ? 2 : 0) + (low ? 1 : 0);
  const float inv_q = rcp_approx(qc);
  const float mine = pc == 0.f ? 0.f : f * pc * inv_q;
  const bool counts = (in_run & (half | (eighth - 1))) == 0 && (slot * W + g) * kVec < K;  // one lane a class
  if (counts) *d += class_divergence(pc, inv_q, log2_sum);
  const int base = w.lane() - in_run;
#pragma unroll
  for (int c = 0; c < 4; ++c) r[c] = w.from_lane(mine, base + (c >> 1) * quarter + (c & 1) * eighth);
  return counts && pc > 0.f && !(qc >= 0x1p-90f);
}

// The factors r and the divergence terms of row_class_kl_chunked from the slots' chunk sums p and q
// (by slot: overwritten): reduce-scattered (kScattered) or by slot, after summing a class's G slots in the lane.
template <class Warp, int CH, int V>
LELP_DEV bool class_factors(const Warp& w, const LossArgs& a, int K, int sc, float log2_sum, float* p, float* q,
                            float* r, float* d) {
  constexpr int W = Warp::kWidth;
  const int group = sc > W ? sc / W : 1, run = sc < W ? sc : W;  // powers of two
  const float f = (1.f - a.subclass_weight) * a.tau;
  if constexpr (CH == 4 && V == kVec) {
    if (class_sums_form<Warp, CH, V>(a) == kScattered)
      return class_factors_scattered(w, K, run, f, log2_sum, p, q, r, d);
  }
  // Each slot's part of its class: the sum over its aligned G slots, a butterfly over the slots (G
  // is a run-time value; summing every slot with a mask took CH^2 selects and adds)
#pragma unroll
  for (int h = 1; h < CH; h *= 2)
    if (h < group)  // warp-uniform
#pragma unroll
      for (int c = 0; c < CH; ++c)
        if ((c & h) == 0 && (c | h) < CH) {
          const float sp = p[c] + p[c | h], sq = q[c] + q[c | h];
          p[c] = p[c | h] = sp;
          q[c] = q[c | h] = sq;
        }
  return class_factors_by_slot<Warp, CH, V>(w, K, sc, run, f, log2_sum, p, q, r, d);
}

// The sum of one chunk's V values, pairwise.
template <int V>
LELP_DEV float chunk_sum(const float* x) {
  static_assert(V == kVec || V == kClassVec, "a chunk holds 4 or 5 values");
  const float four = (x[0] + x[1]) + (x[2] + x[3]);
  if constexpr (V == kVec) return four;
  else return four + x[4];
}

// row_class_kl in registers, for rows whose classes are whole chunks (classes_in_chunks). Chunk slot
// c of lane g is row chunk c W + g, of class (c W + g) / Sc (Sc = S / V chunks a class): with
// Sc <= W a class is one slot of an aligned run of Sc lanes (a butterfly over them, or reduce-
// scattered), with Sc > W it is G = Sc / W neighbouring slots of every lane of the group (their sum,
// then the group's). Every lane then has its slots' class sums p (of t) and q (of qu); a class's
// first chunk adds its divergence term. Returns false, leaving gr alone, if a class of the warp has
// a share of qu below 2^-90 (row_class_kl then sums the warp's classes exactly).
template <class Warp, int CH, int V>
LELP_DEV bool row_class_kl_chunked(const Warp& w, const LossArgs& a, float log2_sum, const float* qu, const float* t,
                                   float* gr, float* d_out) {
  const int K = static_cast<int>(a.C * a.S), sc = static_cast<int>(a.S) / V;
  float p[CH], q[CH];
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    p[c] = chunk_sum<V>(t + c * V);
    q[c] = chunk_sum<V>(qu + c * V);
  }
  float r[CH], d = 0.f;
  const bool inexact = class_factors<Warp, CH, V>(w, a, K, sc, log2_sum, p, q, r, &d);
  if (w.any(inexact)) return false;
#pragma unroll
  for (int c = 0; c < CH; ++c)
#pragma unroll
    for (int e = 0; e < V; ++e) gr[c * V + e] -= r[c] * qu[c * V + e];
  *d_out = d;  // the lane's part: row_kl reduces it with the KL's
  return true;
}

// tau^2 D(t, q) of one row and its gradient into gr (lanes' slots; absent elements masked), for the
// divergences other than KL (row_kl).
template <class Warp, int CH, int V>
LELP_DEV float row_divergence(const Warp& w, const LossArgs& a, const float* s, const float* lt, float* gr) {
  constexpr int W = Warp::kWidth, P = CH * V;
  const int g = w.lane() % W, K = static_cast<int>(a.C * a.S);
  const float tau = a.tau, inv_tau = 1.f / tau;
  float q[P], lq[P];
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < P; ++i)
    if (element<W, V>(g, i) < K) mx = fmax_(mx, s[i]);
  mx = w.max(mx);
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < P; ++i) {
    lq[i] = scaled_gap(s[i], mx, inv_tau);  // shifted first at tau < 1: s / tau can overflow
    q[i] = element<W, V>(g, i) < K ? expf(lq[i]) : 0.f;
    sum += q[i];
  }
  sum = w.sum(sum);
  const float inv_sum = 1.f / sum, log_sum = logf(sum);
#pragma unroll
  for (int i = 0; i < P; ++i) {
    q[i] *= inv_sum;
    lq[i] -= log_sum;
  }
  float d = 0.f;
  if (a.divergence == kMSE) {  // s / tau centred, from the shifted log q
    float ms = 0.f, mt = 0.f;
#pragma unroll
    for (int i = 0; i < P; ++i)
      if (element<W, V>(g, i) < K) {
        ms += lq[i];
        mt += lt[i];
      }
    ms = w.sum(ms) / static_cast<float>(K);
    mt = w.sum(mt) / static_cast<float>(K);
#pragma unroll
    for (int i = 0; i < P; ++i) {
      const float e = (lq[i] - ms) - (lt[i] - mt);
      gr[i] = 2.f * tau * e / static_cast<float>(K);
      if (element<W, V>(g, i) < K) d += e * e;
    }
    return tau * tau * w.sum(d) / static_cast<float>(K);
  }
  const float log_b = logf(a.jsd_beta), log_1mb = logf(1.f - a.jsd_beta);
  float qa = 0.f;
#pragma unroll
  for (int i = 0; i < P; ++i) {
    if (element<W, V>(g, i) >= K) {
      gr[i] = 0.f;
      continue;
    }
    d += divergence_term(a.divergence, a.jsd_beta, log_b, log_1mb, expf(lt[i]), lt[i], q[i], lq[i], &gr[i]);
    qa += q[i] * gr[i];
  }
  qa = w.sum(qa);
#pragma unroll
  for (int i = 0; i < P; ++i) gr[i] = tau * q[i] * (gr[i] - qa);
  return tau * tau * w.sum(d);
}

// tau^2 KL(t||q) of one row and its gradient into gr, in base 2 so that each exponential is one MUFU
// op (exp2_approx of an argument scaled once): x2 = (s - max s) log2(e) / tau is log2 of q's
// unnormalised value qu, so log q = (x2 - log2 sum qu) ln 2. A t of 0 adds 0 to the loss (its log t
// may be -inf); a NaN anywhere in the row reaches the loss and the gradient. e: exp(s - max s) for
// the hard-label term when want_e (qu itself at tau = 1, its square at tau = 2), else left alone.
// log q is taken in natural units, s / tau - (max s / tau + ln sum), with s / tau inside an FFMA (its
// product not rounded): it stays finite wherever log q is, where the log2 form overflowed with
// |s| log2(e) / tau. Where max s log2(e) / tau passes 2^30 (|max s| > 7.4e8 tau; rare, warp-uniform;
// until session 66 only past FLT_MAX, 2.4e38 tau), x2 and log q are shifted before they are scaled (kShiftFirst, scaled_gap), which
// costs an instruction per element more in each; the common rows keep x2 one FFMA.
// mx: the row's max s (row_kl).
template <class Warp, int CH, int V, bool kShiftFirst>
LELP_DEV float row_kl_from_max(const Warp& w, const LossArgs& a, const float* s, float mx, const float* lt, float* u,
                               float* gr, bool want_e, float* e) {
  constexpr int P = CH * V;
  const float tau = a.tau, scale2 = kLog2e / tau, m2 = kShiftFirst ? 0.f : mx * scale2;
  float qu[P], t[P], sum = 0.f, st = 0.f;  // x2 is recomputed where needed: 16 fewer registers
#pragma unroll
  for (int i = 0; i < P; ++i) {
    qu[i] = exp2_approx(kShiftFirst ? scaled_gap(s[i], mx, scale2) : s[i] * scale2 - m2);  // 0 in absent slots
    t[i] = exp2_approx(lt[i] * kLog2e);
    sum += qu[i];
    st += t[i];
  }
  sum = w.sum(sum);
  st = w.sum(st);
  const float log2_sum = log2_approx(sum);
  const bool weighted = subclass_weighted(a);
  const float lambda = weighted ? a.subclass_weight : 1.f;  // the subclass weight scales the t term
  const float gq = tau * st * exp2_approx(-log2_sum), gt = tau * lambda;
  const float inv_tau = 1.f / tau, log_sum = kLn2 * log2_sum, log_rest = mx * inv_tau + log_sum;
  float d = 0.f;
#pragma unroll
  for (int i = 0; i < P; ++i) {
    // log t - log q; the FFMA's product is not rounded, so s / tau does not overflow on its own
    const float log_ratio = kShiftFirst ? (lt[i] + log_sum) - scaled_gap(s[i], mx, inv_tau)
                                        : fmaf(-s[i], inv_tau, lt[i] + log_rest);
    d = t[i] == 0.f ? d : t[i] * log_ratio + d;
    gr[i] = gq * qu[i] - gt * t[i];
  }
  // One reduction for the KL and, in registers, the class term: the lane's parts; d_row: a class
  // term already summed over the row.
  float d_lane = d, d_row = 0.f;
  if (weighted) {
    float d_class;
    if (classes_are_whole_chunks<Warp, CH, V>(a) &&
        row_class_kl_chunked<Warp, CH, V>(w, a, log2_sum, qu, t, gr, &d_class)) {
      d_lane = lambda * d + (1.f - lambda) * d_class;
    } else {
      d_lane = lambda * d;
      if constexpr (V == kVec) {
        d_row = (1.f - lambda) * row_class_kl<Warp, CH, V>(w, a, s, scale2, mx, log2_sum, qu, t, u, gr);
      } else {  // chunks of 5 hold whole classes (chunk_width): only the exact sums are left
        d_row = (1.f - lambda) * row_class_kl_exact<Warp, CH, V>(w, a, s, scale2, mx, log2_sum, qu, t, u, gr);
      }
    }
  }
  if (want_e) {  // after the class sums, so that e and the sums' registers are not live at once
    const int hard_tau = tau == 1.f ? 1 : (tau == 2.f ? 2 : 0);
#pragma unroll
    for (int i = 0; i < P; ++i)
      e[i] = hard_tau == 1 ? qu[i]
             : hard_tau == 2 ? qu[i] * qu[i]
                             : exp2_approx((s[i] - mx) * kLog2e);
  }
  return tau * tau * (w.sum(d_lane) + d_row);
}

// row_kl_from_max after the row's max, in the form that max takes (the cost model's CostWarp::any is
// false: it counts the common form only, as a row takes one or the other).
template <class Warp, int CH, int V>
LELP_DEV float row_kl(const Warp& w, const LossArgs& a, const float* s, const float* lt, float* u, float* gr,
                      bool want_e, float* e) {
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < CH * V; ++i) mx = fmax_(mx, s[i]);  // absent slots hold -inf (loss_row)
  mx = w.max(mx);
  // Shifted first also where max s log2(e) / tau passes 2^30: the FFMA s * scale2 - m2 takes m2's rounding
  // error (up to half its ulp) as a common offset of every x2, which past 2^31 sends exp2 to 0 or inf
  if (w.any(!(fabsf(mx * (kLog2e / a.tau)) <= 0x1p30f)))  // a NaN row too: it stays NaN
    return row_kl_from_max<Warp, CH, V, true>(w, a, s, mx, lt, u, gr, want_e, e);
  return row_kl_from_max<Warp, CH, V, false>(w, a, s, mx, lt, u, gr, want_e, e);
}

// alpha * CE(y, pooled class logits) of one row; adds its gradient to gr. Class logits
// p_c = logsumexp_s s_{c,s}: CE = logsumexp(s) - p_y, dCE/ds_k = softmax(s)_k - [k in y] softmax_y(s)_k.
// y outside [0, C) (no label, ignored rows): returns 0 and leaves gr alone.
template <class Warp, int CH, int V>
LELP_DEV float row_hard_label(const Warp& w, const LossArgs& a, const float* s, int64_t y, float* gr) {
  constexpr int W = Warp::kWidth, P = CH * V;
  const int g = w.lane() % W, S = static_cast<int>(a.S), K = static_cast<int>(a.C * a.S);
  float m_all = -INFINITY, m_y = -INFINITY;
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const int k = element<W, V>(g, i);
    if (k < K) m_all = fmax_(m_all, s[i]);
    if (k < K && k / S == y) m_y = fmax_(m_y, s[i]);
  }
  m_all = w.max(m_all);
  m_y = w.max(m_y);
  float e_all = 0.f, e_y = 0.f;
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const int k = element<W, V>(g, i);
    if (k < K) e_all += expf(s[i] - m_all);
    if (k < K && k / S == y) e_y += expf(s[i] - m_y);
  }
  e_all = w.sum(e_all);
  e_y = w.sum(e_y);
  if (y < 0 || y >= a.C) return 0.f;
  const float lse_all = m_all + logf(e_all), p_y = m_y + logf(e_y);
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const int k = element<W, V>(g, i);
    gr[i] += a.alpha * (expf(s[i] - lse_all) - (k / S == y ? expf(s[i] - p_y) : 0.f));
  }
  return a.alpha * (lse_all - p_y);
}

// The hard-label term's row factors from a lane's parts of sum e (e_all) and of class y's (e_y):
// f_all = alpha / sum e, f_y = alpha / sum_y e, and the term alpha CE. False where class y's share is
// below 2^-90 of the row in some row of the warp (the caller then takes row_hard_label's exact sums).
struct HardLabelFactors {
  float f_all, f_y, loss;
};

template <class Warp>
LELP_DEV bool hard_label_factors(const Warp& w, const LossArgs& a, bool valid, float e_all, float e_y,
                                 HardLabelFactors* h) {
  e_all = w.sum(e_all);
  e_y = w.sum(e_y);
  if (w.any(valid && !(e_y >= 0x1p-90f))) return false;
  const float log2_all = log2_approx(e_all), log2_y = log2_approx(e_y);
  *h = {a.alpha * exp2_approx(-log2_all), a.alpha * exp2_approx(-log2_y), a.alpha * kLn2 * (log2_all - log2_y)};
  return true;
}

// The hard-label term of row_hard_label from e = exp(s - max s) (0 in absent slots), which the KL
// step has already computed: CE = ln(sum e / sum_{k in y} e), dCE/ds_k = e_k / sum e - [k in y]
// e_k / sum_{k in y} e; no exponential per element. If class y's share is below 2^-90 of the row
// (its logits some 60 below the row's max) e loses it, and the warp takes row_hard_label's exact
// sums (warp-uniform: every lane of the warp takes part in its reductions).
template <class Warp, int CH, int V>
LELP_DEV float row_hard_label_from_exp(const Warp& w, const LossArgs& a, const float* s, const float* e, int64_t y,
                                       float* gr) {
  constexpr int W = Warp::kWidth, P = CH * V;
  const int g = w.lane() % W;
  const bool valid = y >= 0 && y < a.C;
  const int lo = valid ? static_cast<int>(y * a.S) : 0, S = static_cast<int>(a.S);
  float ey[P], e_all = 0.f, e_y = 0.f;  // ey: e in class y's slots, else 0
#pragma unroll
  for (int i = 0; i < P; ++i) {
    ey[i] = static_cast<unsigned>(element<W, V>(g, i) - lo) < static_cast<unsigned>(S) ? e[i] : 0.f;
    e_all += e[i];
    e_y += ey[i];
  }
  HardLabelFactors h;
  if (!hard_label_factors(w, a, valid, e_all, e_y, &h)) return row_hard_label<Warp, CH, V>(w, a, s, y, gr);
  if (!valid) return 0.f;
  const float f_all = h.f_all, f_y = h.f_y;
#pragma unroll
  for (int i = 0; i < P; ++i) gr[i] = fmaf(e[i], f_all, fmaf(-ey[i], f_y, gr[i]));  // two FMAs
  return h.loss;
}

// row_hard_label_from_exp for rows whose classes are whole chunks (S % V == 0; loss_row takes it
// where classes_are_whole_chunks): class y's slots are whole chunks, so its mask, its sum and the
// gradient's factor take a chunk at a time (one compare, one select a chunk, one FMA an element;
// the element-wise form takes a compare and a select an element, and two FMAs).
template <class Warp, int CH, int V>
LELP_DEV float row_hard_label_from_exp_chunks(const Warp& w, const LossArgs& a, const float* s, const float* e,
                                              int64_t y, float* gr) {
  constexpr int W = Warp::kWidth;
  const int g = w.lane() % W, sc = static_cast<int>(a.S) / V;
  const bool valid = y >= 0 && y < a.C;
  const int first = valid ? static_cast<int>(y) * sc : 0;  // class y's first chunk of the row
  float e_all = 0.f, e_y = 0.f;
  bool in_y[CH];
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    const float chunk = chunk_sum<V>(e + c * V);
    in_y[c] = static_cast<unsigned>(c * W + g - first) < static_cast<unsigned>(sc);
    e_all += chunk;
    e_y += in_y[c] ? chunk : 0.f;
  }
  HardLabelFactors h;
  if (!hard_label_factors(w, a, valid, e_all, e_y, &h)) return row_hard_label<Warp, CH, V>(w, a, s, y, gr);
  if (!valid) return 0.f;
  const float f_all = h.f_all, f_y = h.f_y;
  const float f_in = f_all - f_y;  // dCE/ds_k / e_k in class y
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    const float f = in_y[c] ? f_in : f_all;
#pragma unroll
    for (int i = c * V; i < (c + 1) * V; ++i) gr[i] = fmaf(e[i], f, gr[i]);
  }
  return h.loss;
}

// Stores one row's outputs (an ignored row's loss 0, its gradient times 0); the gradient times
// `scale` in a.grad_dtype.
template <class Warp, int CH, int V>
LELP_DEV void store_row(const LossArgs& a, int64_t row, int g, bool vec, bool ignored, float loss, float hard,
                        float scale, float* gr) {
  constexpr int W = Warp::kWidth;
  const int K = static_cast<int>(a.C * a.S);
  const int64_t base = row * K;
  // an ignored row's gradient is 0 (NaN where its inputs are, as in the reference and the Triton
  // kernel): a factor of the row, not a select an element
  const float factor = ignored ? 0.f : scale;
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    float* v = gr + c * V;
#pragma unroll
    for (int e = 0; e < V; ++e) v[e] *= factor;
    const int k0 = (c * W + g) * V;
    if constexpr (V != kVec) {  // chunks of 5: K % 5 == 0 (chunk_width), a chunk is whole or past the end
      if (k0 < K)
#pragma unroll
        for (int e = 0; e < V; ++e) Warp::store(a.grad, a.grad_dtype, base + k0 + e, v[e]);
    } else if (vec) {  // K % 4 == 0: a chunk is whole or past the end
      if (k0 < K) Warp::store4(a.grad, a.grad_dtype, base + k0, v);
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e)
        if (k0 + e < K) Warp::store(a.grad, a.grad_dtype, base + k0 + e, v[e]);
    }
  }
  if (g == 0) {
    a.loss_rows[row] = ignored ? 0.f : loss;
    if (a.hard_rows != nullptr) a.hard_rows[row] = ignored ? 0.f : hard;
  }
}

// One row. Lanes past the last row (row >= n) compute the last row again, without branches around
// the loads, only to take part in the warp's reductions; they store nothing. Absent slots hold
// -inf in s and log t, which the KL step's exponentials turn into 0 without masks.
template <class Warp, int CH, int V>
LELP_DEV void loss_row(const Warp& w, const LossArgs& a, const OnlineTeachers& online, float* u, int64_t row, bool vec,
                       float scale) {
  constexpr int P = CH * V;
  const int g = w.lane() % Warp::kWidth, K = static_cast<int>(a.C * a.S);
  const bool active = row < a.n;
  const int64_t r = active ? row : a.n - 1;  // n >= 1 (loss_cuda returns early on n = 0)
  int64_t y = -1;  // no hard-label term
  bool ignored = false;
  if (a.labels != nullptr) {
    y = a.labels[r];
    ignored = y == a.ignore_index;
  }
  float lt[P], s[P], gr[P];
  lane_log_targets<Warp, CH, V>(w, a, online, u, r, vec, lt);
  load_row<Warp, CH, V>(a.student, a.student_dtype, r * a.student_stride, K, g, vec, -INFINITY, s);
  const bool hard_term = a.alpha != 0.f && a.labels != nullptr;
  float loss = 0.f, hard = 0.f;
  if (a.divergence == kKL) {
    float e[P];  // exp(s - max s) for the hard-label term
    loss = row_kl<Warp, CH, V>(w, a, s, lt, u, gr, hard_term, e);
    // classes of whole chunks (as row_kl's class sums in registers at lambda != 1)
    if (hard_term && classes_are_whole_chunks<Warp, CH, V>(a))
      hard = row_hard_label_from_exp_chunks<Warp, CH, V>(w, a, s, e, ignored ? -1 : y, gr);
    else if constexpr (V == kVec) {  // chunks of 5 are always whole classes (class_sums_form)
      if (hard_term) hard = row_hard_label_from_exp<Warp, CH, V>(w, a, s, e, ignored ? -1 : y, gr);
    }
  } else if constexpr (V == kVec) {  // chunks of 5 take the KL only (chunk_width)
    loss = row_divergence<Warp, CH, V>(w, a, s, lt, gr);
    if (hard_term) hard = row_hard_label<Warp, CH, V>(w, a, s, ignored ? -1 : y, gr);
  }
  loss += hard;
  if (active) store_row<Warp, CH, V>(a, row, g, vec, ignored, loss, hard, scale, gr);
}

// The rows of one warp, grid-stride: warp `warp_id` of `n_warps` takes rows base .. base + 32/W - 1.
// smem: the warp's scratch, 32/W rows of loss_row_scratch_floats (nullptr if that is 0).
template <class Warp, int CH, int V>
LELP_DEV void loss_rows(const Warp& w, const LossArgs& a, const OnlineTeachers& online, float* smem, int64_t warp_id,
                        int64_t n_warps, bool vec) {
  constexpr int R = 32 / Warp::kWidth;
  const int slot = w.lane() / Warp::kWidth;
  float* u = smem == nullptr ? nullptr : smem + slot * loss_row_scratch_floats(a, online.m > 0);
  const float scale = a.grad_scale == nullptr ? 1.f : *a.grad_scale;  // read once: no host sync
  for (int64_t base = warp_id * R; base < a.n; base += n_warps * R)  // warp-uniform
    loss_row<Warp, CH, V>(w, a, online, u, base + slot, vec, scale);
}

// The group width and chunks per lane for K in chunks of V: CH chunks per lane, up to 4 (16 or 20
// values: the row's per-lane work, its reductions and their shuffles, are then shared by them), then
// W lanes per row, a power of two <= 32, with CH = ceil(chunks / W) so that at most W - 1 chunks of a
// row are padding (K = 40 in chunks of 4: 4 lanes x 3 chunks, 48 slots). K <= 512.
LELP_HD void loss_shape(int K, int V, int* width, int* chunks) {
  const int need = (K + V - 1) / V;  // chunks of the row
  int w = 1;
  while (w < 32 && (need + w - 1) / w > 4) w *= 2;
  *width = w;
  *chunks = (need + w - 1) / w;
}

// The elements per chunk of a row (kVec or kClassVec): 5 where the KL's class-wise work (lambda != 1,
// the hard-label term) meets classes of S = 5 2^j subclasses, which are not a power-of-two number of
// chunks of 4 (S = 5, 10: split at class boundaries; 20, 40, ...: 5 2^(j-2) chunks), so that their
// sums would go through shared memory (row_class_kl), and the row has at most kMaxClassVecChunks
// chunks of 5; otherwise 4.
LELP_HD int chunk_width(const LossArgs& a) {
  const bool class_wise = a.divergence == kKL && (subclass_weighted(a) || (a.alpha != 0.f && a.labels != nullptr));
  const bool one_teacher = a.online == nullptr && a.weights == nullptr;  // precomputed, not mixed
  const bool fits = a.C * a.S <= kClassVec * kMaxClassVecChunks;
  return class_wise && one_teacher && fits && classes_in_chunks(a, kClassVec) ? kClassVec : kVec;
}

// The kernel instantiation (W lanes, CH chunks of V) that takes the rows of `a`: loss_shape's in
// chunks of chunk_width(a); in chunks of 5 one lane a row takes 2 or 4 chunks (so that 8 layouts
// serve them: W = 1, 2, 4, 8).
LELP_HD void loss_layout(const LossArgs& a, int* width, int* chunks, int* vec) {
  *vec = chunk_width(a);
  loss_shape(static_cast<int>(a.C * a.S), *vec, width, chunks);
  if (*vec == kClassVec && *width == 1) *chunks = *chunks <= 2 ? 2 : 4;
}

// Calls f(integral_constant<int, W>{}, integral_constant<int, CH>{}, integral_constant<int, V>{})
// with loss_layout(a)'s (W, CH, V): the one place that maps a shape to a kernel instantiation (the
// CUDA launch and the tests' host run).
template <class F>
inline void with_loss_layout(const LossArgs& a, F&& f) {
  int width, chunks, vec;
  loss_layout(a, &width, &chunks, &vec);
  using std::integral_constant;
  using I1 = integral_constant<int, 1>;
  using I2 = integral_constant<int, 2>;
  using I3 = integral_constant<int, 3>;
  using I4 = integral_constant<int, 4>;
  const auto one = [&](auto w, auto v) {  // W > 1 takes 3 or 4 chunks (loss_shape)
    if (chunks == 3) return f(w, I3{}, v);
    return f(w, I4{}, v);
  };
  if (vec == kClassVec) {
    const integral_constant<int, kClassVec> v;
    switch (width) {
      case 1: return chunks == 2 ? f(I1{}, I2{}, v) : f(I1{}, I4{}, v);
      case 2: return one(I2{}, v);
      case 4: return one(I4{}, v);
      default: return one(integral_constant<int, 8>{}, v);  // at most 32 chunks (chunk_width)
    }
  }
  const integral_constant<int, kVec> v;
  switch (width) {
    case 1:
      switch (chunks) {
        case 1: return f(I1{}, I1{}, v);
        case 2: return f(I1{}, I2{}, v);
        case 3: return f(I1{}, I3{}, v);
        default: return f(I1{}, I4{}, v);
      }
    case 2: return one(I2{}, v);
    case 4: return one(I4{}, v);
    case 8: return one(integral_constant<int, 8>{}, v);
    case 16: return one(integral_constant<int, 16>{}, v);
    default: return one(integral_constant<int, 32>{}, v);
  }
}

// The kernel parameter of the online teachers (m = 0 for precomputed targets).
inline OnlineTeachers online_teachers(const LossArgs& a) {
  OnlineTeachers online{};
  if (a.online == nullptr) return online;
  if (a.n_teachers > kMaxOnlineTeachers)
    throw std::invalid_argument("cuda loss: at most 8 online teachers (pass precomputed targets for more)");
  online.m = static_cast<int>(a.n_teachers);
  for (int m = 0; m < online.m; ++m) online.t[m] = a.online[m];
  return online;
}

// Whether every row the kernel reads or writes in chunks of 4 starts 16-byte (fp32) or 8-byte
// (bf16/fp16) aligned, so that the chunks move as vector loads and stores.
inline bool vector_loads_ok(const LossArgs& a) {
  const auto aligned = [](const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; };
  const int64_t K = a.C * a.S;
  const auto size = [](int dtype) { return dtype == kFloat32 ? 4 : 2; };
  bool ok = K % kVec == 0 && a.student_stride % kVec == 0 && aligned(a.student, kVec * size(a.student_dtype)) &&
            aligned(a.grad, kVec * size(a.grad_dtype));
  if (a.online == nullptr) ok = ok && a.targets_stride % kVec == 0 && aligned(a.log_targets, kVec * size(a.targets_dtype));
  return ok;
}

}  // namespace warp
}  // namespace lelp
