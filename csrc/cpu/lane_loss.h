// The KL loss of short rows (K <= kLaneMaxK) with rows across the vector lanes: a group of
// kLanes rows is held column by column (x[k * kLanes + l] is row l's column k), so that the row
// max, the exponentials, the row sums, the logarithms and the gradient are vertical operations on
// whole vectors (one AVX-512 vector, two AVX2 ones, per column), with no horizontal reductions and
// no per-row loops. The math is kl_rows' and hard_label_term's (lelp/loss_math.h), element for
// element; a row whose labelled class underflows against its max (their exact fallback) is marked
// for the caller to redo with block_loss_grad. At K = 10 the row-major kernel spent most of its
// time in per-row loops of 10 values (docs/benchmarks.md, issue 21).
#pragma once

#include <cmath>
#include <cstdint>

#include "lelp/loss_math.h"

#if defined(_OPENMP)
#define LELP_LANES _Pragma("omp simd")
#else
#define LELP_LANES
#endif

namespace lelp {
namespace cpu {

constexpr int kLanes = 16;
// Up to 32 columns: an A/B had the lane layout ahead of the row-major kernel at K = 16 and 20 and level
// to ahead at K = 32 (docs/benchmarks.md); a group's six arrays (12 KiB at K = 32) stay in L1.
constexpr int kLaneMaxK = 32;

// One group of rows: inputs s and lt (fp32 logits and log-targets), outputs g (dL/ds), loss and
// hard (alpha * CE, written when the term is computed), all column by column; y: the label per
// lane (-1: no hard-label term). Unused lanes hold finite inputs and y = -1.
struct LaneGroup {
  float s[kLaneMaxK * kLanes], lt[kLaneMaxK * kLanes], g[kLaneMaxK * kLanes];
  float lq[kLaneMaxK * kLanes], q[kLaneMaxK * kLanes], t[kLaneMaxK * kLanes];  // scratch
  int32_t y[kLanes];
  float loss[kLanes], hard[kLanes];
  bool exact[kLanes];  // the caller redoes this row (the alpha term's exact fallback)
};

// The alpha term where it does not fold into the KL pass (tau other than 1 and 2):
// e = exp(s - max s) with one more exponential, as hard_label_term does.
LELP_HD void lanes_hard_label_term(LaneGroup& G, int K, int S, float alpha, const float* s_max) {
  float sum_e[kLanes] = {}, sum_y[kLanes] = {};
  for (int k = 0; k < K; ++k) {
    const int cls = k / S;
    LELP_LANES
    for (int l = 0; l < kLanes; ++l) {
      const float e = fast_exp(G.s[k * kLanes + l] - s_max[l]);
      G.t[k * kLanes + l] = e;
      sum_e[l] += e;
      sum_y[l] += G.y[l] == cls ? e : 0.f;
    }
  }
  float w_all[kLanes], w_y[kLanes];
  LELP_LANES
  for (int l = 0; l < kLanes; ++l) {
    const bool term = G.y[l] >= 0, ok = sum_y[l] > 1e-30f;
    G.exact[l] = term && !ok;
    const float ce = term && ok ? alpha * logf(sum_e[l] / sum_y[l]) : 0.f;
    G.loss[l] += ce;
    G.hard[l] = ce;
    w_all[l] = term && ok ? alpha / sum_e[l] : 0.f;
    w_y[l] = term && ok ? alpha / sum_y[l] : 0.f;
  }
  for (int k = 0; k < K; ++k) {
    const int cls = k / S;
    LELP_LANES
    for (int l = 0; l < kLanes; ++l) {
      const float e = G.t[k * kLanes + l];
      float g = G.g[k * kLanes + l] + e * w_all[l];
      G.g[k * kLanes + l] = G.y[l] == cls ? g - e * w_y[l] : g;
    }
  }
}

// KL(t||q) (q = softmax(s / tau)) and its gradient for one group, with the alpha term
// (alpha != 0 and labels given): folded into the KL pass at tau = 1 (e = q) and 2 (e = q^2),
// a pass of its own otherwise. The subclass weight is 1 (or S = 1, where it changes nothing).
LELP_HD void kl_lanes(LaneGroup& G, int K, int S, float tau, float alpha, bool labels) {
  const float inv_tau = 1.f / tau;
  const bool term = alpha != 0.f && labels;
  const bool fold = term && hard_label_folds(tau), square = tau == 2.f;
  float s_max[kLanes];
  LELP_LANES
  for (int l = 0; l < kLanes; ++l) s_max[l] = -INFINITY;
  for (int k = 0; k < K; ++k) {
    LELP_LANES
    for (int l = 0; l < kLanes; ++l) s_max[l] = fmax_(s_max[l], G.s[k * kLanes + l]);
  }
  // q (unnormalised), log q, t and their sums; for the folded term, e = q or q^2 summed over the
  // label's class (sum_y) and, at tau = 2, over the row (sum_qq; at tau = 1 it is sum_q).
  float sum_q[kLanes] = {}, sum_t[kLanes] = {}, sum_qq[kLanes] = {}, sum_y[kLanes] = {};
  for (int k = 0; k < K; ++k) {
    const int cls = k / S;
    LELP_LANES
    for (int l = 0; l < kLanes; ++l) {
      const int i = k * kLanes + l;
      const float lq = scaled_gap(G.s[i], s_max[l], inv_tau);  // shifted first at tau < 1: s / tau can overflow
      const float q = fast_exp(lq), t = fast_exp(G.lt[i]);
      G.lq[i] = lq;
      G.q[i] = q;
      G.t[i] = t;
      sum_q[l] += q;
      sum_t[l] += t;
      sum_qq[l] += q * q;
      sum_y[l] += G.y[l] == cls ? (square ? q * q : q) : 0.f;
    }
  }
  float row_inv[kLanes], row_log[kLanes], cq[kLanes], w_all[kLanes], w_y[kLanes];
  LELP_LANES
  for (int l = 0; l < kLanes; ++l) {
    row_inv[l] = 1.f / sum_q[l];
    row_log[l] = logf(sum_q[l]);
    const float sum_e = square ? sum_qq[l] : 1.f / row_inv[l];  // as kl_rows
    const bool has = fold && G.y[l] >= 0, ok = sum_y[l] > 1e-30f;
    G.exact[l] = has && !ok;
    const float ce = has && ok ? alpha * logf(sum_e / sum_y[l]) : 0.f;
    G.loss[l] = ce;
    G.hard[l] = ce;
    w_all[l] = has && ok ? alpha / sum_e : 0.f;
    w_y[l] = has && ok ? alpha / sum_y[l] : 0.f;
    cq[l] = tau * sum_t[l] * row_inv[l];
  }
  float d[kLanes] = {};
  for (int k = 0; k < K; ++k) {
    const int cls = k / S;
    LELP_LANES
    for (int l = 0; l < kLanes; ++l) {
      const int i = k * kLanes + l;
      const float q = G.q[i], t = G.t[i];
      const float g = square ? q * (cq[l] + w_all[l] * q) - tau * t : (cq[l] + w_all[l]) * q - tau * t;
      G.g[i] = G.y[l] == cls ? g - w_y[l] * (square ? q * q : q) : g;
      d[l] += xlogx_ratio(t, G.lt[i], G.lq[i] - row_log[l]);
    }
  }
  LELP_LANES
  for (int l = 0; l < kLanes; ++l) G.loss[l] += tau * tau * d[l];
  if (term && !fold) lanes_hard_label_term(G, K, S, alpha, s_max);
}

// The input check's row flags of a group's n rows (the row-major kernel's, from the column sums):
// bit 0 the logits' sum is not finite; with check_t, bit 1 the log-targets' sum is not <= 0,
// otherwise bit 1 is kept as the caller set it.
LELP_HD void check_lanes(const LaneGroup& G, int K, int n, bool check_t, uint8_t* flags) {
  float sum_s[kLanes] = {}, sum_t[kLanes] = {};
  for (int k = 0; k < K; ++k) {
    LELP_LANES
    for (int l = 0; l < kLanes; ++l) {
      sum_s[l] += G.s[k * kLanes + l];
      sum_t[l] += G.lt[k * kLanes + l];
    }
  }
  for (int l = 0; l < n; ++l) {
    const int s_bit = std::isfinite(sum_s[l]) ? 0 : 1;
    const int t_bit = check_t ? (sum_t[l] <= 0.f ? 0 : 1) : (flags[l] >> 1) & 1;
    flags[l] = static_cast<uint8_t>(s_bit | (t_bit << 1));
  }
}

}  // namespace cpu
}  // namespace lelp
