// Row math of the distillation loss: the CPU kernel runs block_loss_grad on blocks of rows; the
// CUDA kernel (lelp/warp_loss.h) shares the per-element helpers.
//
// For one row with student logits s (K), log-targets log t (K), q = softmax(s / tau):
//   L = tau^2 * D(t, q) + alpha * CE(y, logsumexp-pool(s))           (docs/algorithm.md)
// and its gradient with respect to s, both in fp32. Every divergence is computed
// from log-probabilities, so huge logits and tiny beta give finite values:
//   KL(t||q)   dL/ds_k = tau (q_k sum_j t_j - t_k)   (sum t = 1 only for exact targets: bf16/fp16
//              log-targets sum to 1 +- 1e-3, and the gradient must stay that of the loss computed)
//   others     dD/dq_j = a_j  =>  dL/ds_k = tau q_k (a_k - sum_j q_j a_j)
//   reverse KL a = log q - log t + 1 (the +1 cancels),
//   JS_b       D = b KL(t||m) + (1-b) KL(q||m), m = b t + (1-b) q (generalised JSD, b = jsd_beta;
//              b = 1/2 is the JS divergence), a = (1-b) (log q - log m),
//   TVD        a = sign(q - t) / 2,
//   MSE        on centred logits: D = mean_k e_k^2, e = (s/tau - mean s/tau) - (log t - mean log t),
//              dL/ds_k = 2 tau e_k / K (no softmax; needs finite log-targets).
#pragma once

#include "lelp/row_math.h"

namespace lelp {

enum Divergence : int { kKL = 0, kReverseKL = 1, kJS = 2, kTVD = 3, kMSE = 4 };

// t * (log t - log x) with the convention 0 * log 0 = 0 (a target of exactly 0); a NaN t stays
// NaN, so a NaN input never becomes a finite loss.
LELP_HD float xlogx_ratio(float t, float log_t, float log_x) {
  return t == 0.f ? 0.f : t * (log_t - log_x);
}

LELP_HD float logaddexp_(float a, float b) {
  const float m = fmax_(a, b);
  if (m == -INFINITY) return -INFINITY;
  return m + logf(expf(a - m) + expf(b - m));
}

// One element's term of D(t, q) for reverse KL, JS_b and TVD, and a = dD/dq_j into *a (see the
// top of this file). log_b, log_1mb: log b and log(1 - b) of the generalised JSD.
LELP_HD float divergence_term(int divergence, float jsd_beta, float log_b, float log_1mb, float t, float log_t,
                              float q, float log_q, float* a) {
  if (divergence == kReverseKL) {
    *a = q == 0.f ? 0.f : log_q - log_t;
    return xlogx_ratio(q, log_q, log_t);
  }
  if (divergence == kJS) {
    const float log_m = logaddexp_(log_b + log_t, log_1mb + log_q);
    *a = q == 0.f ? 0.f : (1.f - jsd_beta) * (log_q - log_m);
    return jsd_beta * xlogx_ratio(t, log_t, log_m) + (1.f - jsd_beta) * xlogx_ratio(q, log_q, log_m);
  }
  *a = q > t ? 0.5f : (q < t ? -0.5f : 0.f);  // TVD
  return 0.5f * fabsf(t - q);
}

// The subclass weight lambda of the KL loss on one row (KL only; S > 1), from the row's logits s, its
// unnormalised q (qu = exp((s - max) / tau), row_log = log sum qu) and targets t:
//   L = tau^2 [lambda KL(t||q) + (1 - lambda) KL(p||Q)],  p_c = sum_{k in c} t_k,  Q_c = sum_{k in c} q_k,
//   dL/ds_k = tau [q_k sum t - lambda t_k - (1 - lambda) p_c q_k / Q_c]   (k in class c),
// the class term reaching s through the pooling tau * logsumexp(s / tau), whose softmax at tau is Q.
// grad (K) comes in holding tau (q_k sum t - lambda t_k); the class term is subtracted here. Returns
// the row's loss given d_sub = sum t (log t - log q). A class whose qu all underflow (its logits
// ~87 tau below the row's max) is summed again from s and its own max, not from (s - max) / tau,
// which keeps only ulp(max - s) of the differences within it (a class 1e6 below: 8.9e-4 off).
LELP_HD float kl_row_subclass_weighted(const float* s, const float* qu, const float* t, int C, int S, float tau,
                                       float lambda, float row_max, float row_log, float d_sub, float* grad) {
  const float inv_tau = 1.f / tau;
  float d_class = 0.f;
  for (int c = 0; c < C; ++c) {
    const int k0 = c * S;
    float p = 0.f, qc = 0.f;
    for (int j = 0; j < S; ++j) {
      p += t[k0 + j];
      qc += qu[k0 + j];
    }
    const float w = (1.f - lambda) * tau * p;  // times q_k / Q_c = qu_k / qc
    if (qc > 1e-30f) {
      d_class += xlogx_ratio(p, logf(p), logf(qc) - row_log);
      const float f = w / qc;
      for (int j = 0; j < S; ++j) grad[k0 + j] -= f * qu[k0 + j];
      continue;
    }
    float m = -INFINITY, acc = 0.f;
    for (int j = 0; j < S; ++j) m = fmax_(m, s[k0 + j]);
    if (m == -INFINITY) {  // a class of -inf logits: Q_c = 0, no gradient (as the CUDA kernel)
      d_class += p > 0.f ? INFINITY : 0.f;
      continue;
    }
    for (int j = 0; j < S; ++j) acc += fast_exp(scaled_gap(s[k0 + j], m, inv_tau));
    const float log_acc = logf(acc);  // log Q_c = (m - row_max) / tau + log_acc - row_log
    d_class += xlogx_ratio(p, logf(p), scaled_gap(m, row_max, inv_tau) + log_acc - row_log);
    for (int j = 0; j < S; ++j) grad[k0 + j] -= w * fast_exp(scaled_gap(s[k0 + j], m, inv_tau) - log_acc);
  }
  return tau * tau * (lambda * d_sub + (1.f - lambda) * d_class);
}

// The alpha term: pooled class logits p_c = logsumexp_s s_{c,s} (at tau = 1); CE = logsumexp_c p_c - p_y
// and dCE/ds_k = softmax(s)_k - [class(k) = y] softmax_within_y(s)_k. With e = exp(s - max s) over
// the row (given as x, e = x or x^2), the gradient adds alpha e_k / sum e and subtracts
// alpha e_k / sum_{k in y} e in class y. hard_label_weights returns those two factors and adds the
// row's CE to *loss and *hard, or returns false when class y underflows against the row's max (a
// gap of more than ~87): then hard_label_row_exact adds the row's term from the class's own max.
LELP_HD bool hard_label_weights(const float* x, bool square, float sum_e, int64_t y, int S, float alpha,
                                float* loss, float* hard, float* w_all, float* w_y) {
  float sum_y = 0.f;
  LELP_SIMD_SUM(sum_y)
  for (int64_t k = y * S; k < (y + 1) * S; ++k) sum_y += square ? x[k] * x[k] : x[k];
  *w_all = *w_y = 0.f;
  if (!(sum_y > 1e-30f)) return false;
  const float ce = alpha * logf(sum_e / sum_y);
  *loss += ce;
  if (hard != nullptr) *hard = ce;
  *w_all = alpha / sum_e;
  *w_y = alpha / sum_y;
  return true;
}

LELP_HD void hard_label_row_exact(const float* s, int64_t K, int64_t y, int S, float alpha, float row_max, float sum_e,
                                  float* loss, float* hard, float* g) {
  float my = -INFINITY, sum_c = 0.f;
  for (int64_t k = y * S; k < (y + 1) * S; ++k) my = fmax_(my, s[k]);
  for (int64_t k = y * S; k < (y + 1) * S; ++k) sum_c += fast_exp(s[k] - my);
  const float lse_all = row_max + logf(sum_e), p_y = my + logf(sum_c);
  *loss += alpha * (lse_all - p_y);
  if (hard != nullptr) *hard = alpha * (lse_all - p_y);
  for (int64_t k = 0; k < K; ++k) g[k] += alpha * fast_exp(s[k] - lse_all);
  for (int64_t k = y * S; k < (y + 1) * S; ++k) g[k] -= alpha * fast_exp(s[k] - p_y);
}

// KL's unnormalised q = exp((s - max s) / tau) is e = exp(s - max s) at tau = 1 and its square root
// at tau = 2: there the KL pass adds the alpha term to the gradient with no exp and no pass of its own.
LELP_HD bool hard_label_folds(float tau) { return tau == 1.f || tau == 2.f; }

// The alpha term of a block of rows (see hard_label_weights) where it does not fold into the KL
// pass: e = exp(s - max s) with one more exp per element, kept in e_buf (R x K).
LELP_HD void hard_label_term(int64_t R, int64_t K, const float* s, int C, int S, float alpha, const int64_t* labels,
                             float* e_buf, float* row_max, float* w_all, float* w_y, float* grad, float* loss,
                             float* hard) {
  for (int64_t r = 0; r < R; ++r) {
    const float* sr = s + r * K;
    float m = -INFINITY;
    LELP_SIMD_MAX(m)
    for (int64_t k = 0; k < K; ++k) m = fmax_(m, sr[k]);
    row_max[r] = m;
    float* e = e_buf + r * K;
    for (int64_t k = 0; k < K; ++k) e[k] = fast_exp(sr[k] - m);
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t y = labels[r];
    w_all[r] = w_y[r] = 0.f;
    if (hard != nullptr) hard[r] = 0.f;
    if (y < 0 || y >= C) continue;  // no hard label (ignored rows; invalid ones are rejected upstream)
    const float* e = e_buf + r * K;
    float sum_e = 0.f;
    LELP_SIMD_SUM(sum_e)
    for (int64_t k = 0; k < K; ++k) sum_e += e[k];
    if (!hard_label_weights(e, false, sum_e, y, S, alpha, loss + r, hard ? hard + r : nullptr, w_all + r, w_y + r))
      hard_label_row_exact(s + r * K, K, y, S, alpha, row_max[r], sum_e, loss + r, hard ? hard + r : nullptr,
                           grad + r * K);
  }
  // Two plain loops (all columns, then the label's class) rather than one with a range select,
  // which GCC left scalar: ~20 % of the CPU kernel's time at C = 2, S = 64 (perf, issue 21).
  for (int64_t r = 0; r < R; ++r) {
    float* __restrict__ g = grad + r * K;
    const float* __restrict__ e = e_buf + r * K;
    const float wa = w_all[r], wy = w_y[r];
    if (wa == 0.f) continue;  // no term, or added exactly above
    for (int64_t k = 0; k < K; ++k) g[k] += e[k] * wa;
    for (int64_t k = labels[r] * S; k < (labels[r] + 1) * S; ++k) g[k] -= e[k] * wy;
  }
}

// The KL rows of block_loss_grad (see there for the arrays; q and log_q unnormalised, times row_inv
// and minus row_log): targets t = exp(log t), then in one pass grad = tau (q sum t - lambda t), the
// alpha term when it folds (tau = 1 or 2; row_max = max s for its exact fallback) and the row's KL.
LELP_HD void kl_rows(int64_t R, int64_t K, const float* s, const float* log_t, int C, int S, float tau, float alpha,
                     const int64_t* labels, float subclass_weight, const float* q, const float* log_q, float* t,
                     const float* row_inv, const float* row_log, const float* row_max, float* grad, float* loss,
                     float* hard) {
  const bool weighted = subclass_weight != 1.f && S > 1;
  const bool fold = alpha != 0.f && labels != nullptr && hard_label_folds(tau);
  const bool square = tau == 2.f;  // e = q^2
  const float ct = weighted ? subclass_weight * tau : tau;  // the subclass weight scales the t term
  for (int64_t r = 0; r < R; ++r) {
    const float* __restrict__ qr = q + r * K;
    const float* __restrict__ lt = log_t + r * K;
    const float* __restrict__ lq = log_q + r * K;
    float* __restrict__ tr = t + r * K;
    float* __restrict__ g = grad + r * K;
    float sum_t = 0.f;
    LELP_SIMD_SUM(sum_t)
    for (int64_t k = 0; k < K; ++k) {
      tr[k] = fast_exp(lt[k]);
      sum_t += tr[k];
    }
    loss[r] = 0.f;
    const int64_t y = fold ? labels[r] : -1;
    float w_all = 0.f, w_y = 0.f, sum_e = 0.f;  // grad += w_all e - [k in y] w_y e
    bool exact = false;
    if (fold) {
      if (hard != nullptr) hard[r] = 0.f;
      if (y >= 0 && y < C) {
        if (square) {
          LELP_SIMD_SUM(sum_e)
          for (int64_t k = 0; k < K; ++k) sum_e += qr[k] * qr[k];
        } else {
          sum_e = 1.f / row_inv[r];
        }
        exact = !hard_label_weights(qr, square, sum_e, y, S, alpha, loss + r, hard ? hard + r : nullptr, &w_all,
                                    &w_y);
      }
    }
    const float cq = tau * sum_t * row_inv[r], lr = row_log[r];
    float d = 0.f;
    if (square) {
      LELP_SIMD_SUM(d)
      for (int64_t k = 0; k < K; ++k) {
        g[k] = qr[k] * (cq + w_all * qr[k]) - ct * tr[k];
        d += xlogx_ratio(tr[k], lt[k], lq[k] - lr);
      }
    } else {
      const float cqa = cq + w_all;  // e = q
      LELP_SIMD_SUM(d)
      for (int64_t k = 0; k < K; ++k) {
        g[k] = cqa * qr[k] - ct * tr[k];
        d += xlogx_ratio(tr[k], lt[k], lq[k] - lr);
      }
    }
    if (w_y != 0.f)
      for (int64_t k = y * S; k < (y + 1) * S; ++k) g[k] -= w_y * (square ? qr[k] * qr[k] : qr[k]);
    if (exact)
      hard_label_row_exact(s + r * K, K, y, S, alpha, row_max[r], sum_e, loss + r, hard ? hard + r : nullptr, g);
    loss[r] += weighted ? kl_row_subclass_weighted(s + r * K, qr, tr, C, S, tau, subclass_weight, row_max[r], lr, d, g)
                        : tau * tau * d;
  }
}

// Scratch floats block_loss_grad needs for R rows of K outputs.
LELP_HD int64_t loss_scratch_floats(int64_t R, int64_t K) { return 3 * R * K + 4 * R; }

// Loss of a block of R rows (row-major R x K arrays, K = C*S or, for KL, a wider row_stride whose
// extra columns hold -inf logits and targets: q = t = 0 there, the loss and the real columns'
// gradient unchanged, the extra columns' gradient 0); writes dL/ds into grad (R x K), the
// per-row loss into loss (R) and, when hard != nullptr, its alpha * CE part into hard (R; written
// only when the hard-label term is computed: alpha != 0 and labels given). labels[r] < 0 means no hard-label term for that row (labels may be
// nullptr). Elementwise work runs over the whole block, so short rows (K = 16) still vectorise.
LELP_HD void block_loss_grad(int64_t R, const float* s, const float* log_t, int C, int S, int divergence,
                             float jsd_beta, float tau, float alpha, const int64_t* labels, float* work,
                             float* grad, float* loss, float* hard, float subclass_weight = 1.f,
                             int64_t row_stride = 0) {
  const int64_t K = row_stride > 0 ? row_stride : static_cast<int64_t>(C) * S, RK = R * K;
  const float inv_tau = 1.f / tau;
  float* log_q = work;
  float* q = work + RK;
  float* t = work + 2 * RK;
  float* row_m = work + 3 * RK;
  float* row_inv = row_m + R;
  float* row_log = row_inv + R;
  float* row_qa = row_log + R;
  // log_softmax(s / tau) and softmax, sharing one exp per element; q stays unnormalised (row_inv
  // folded into its uses) for KL, so that the alpha term can reuse it (kl_rows). Loops that write and
  // reduce in one go keep the block in cache for fewer passes.
  const bool kl = divergence == kKL;
  for (int64_t r = 0; r < R; ++r) {
    float m = -INFINITY;
    LELP_SIMD_MAX(m)
    for (int64_t k = 0; k < K; ++k) m = fmax_(m, s[r * K + k]);
    row_m[r] = m;
  }
  for (int64_t r = 0; r < R; ++r) {
    const float mr = row_m[r];
    float sum = 0.f;
    LELP_SIMD_SUM(sum)
    for (int64_t k = 0; k < K; ++k) {
      const float lq = scaled_gap(s[r * K + k], mr, inv_tau);  // shifted first at tau < 1: s / tau can overflow
      const float e = fast_exp(lq);
      log_q[r * K + k] = lq;
      q[r * K + k] = e;
      sum += e;
    }
    row_inv[r] = 1.f / sum;
    row_log[r] = logf(sum);
  }
  if (!kl) {
    for (int64_t i = 0; i < RK; ++i) t[i] = fast_exp(log_t[i]);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t k = 0; k < K; ++k) {
        q[r * K + k] *= row_inv[r];
        log_q[r * K + k] -= row_log[r];
      }
  }

  if (divergence == kMSE) {
    for (int64_t r = 0; r < R; ++r) {  // s / tau centred, from the shifted log q
      float mean_s = 0.f, mean_t = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        mean_s += log_q[r * K + k];
        mean_t += log_t[r * K + k];
      }
      mean_s /= static_cast<float>(K);
      mean_t /= static_cast<float>(K);
      float d = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        const float e = (log_q[r * K + k] - mean_s) - (log_t[r * K + k] - mean_t);
        grad[r * K + k] = 2.f * tau * e / static_cast<float>(K);
        d += e * e;
      }
      for (int64_t k = 0; k < K; ++k) log_q[r * K + k] = k == 0 ? d / static_cast<float>(K) : 0.f;
    }
  } else if (kl) {
    kl_rows(R, K, s, log_t, C, S, tau, alpha, labels, subclass_weight, q, log_q, t, row_inv, row_log, row_m, grad,
            loss, hard);
  } else {
    // a = dD/dq; then the softmax Jacobian: grad_k = tau q_k (a_k - sum_j q_j a_j).
    const float log_b = logf(jsd_beta), log_1mb = logf(1.f - jsd_beta);
    for (int64_t i = 0; i < RK; ++i) {
      float a;
      log_q[i] = divergence_term(divergence, jsd_beta, log_b, log_1mb, t[i], log_t[i], q[i], log_q[i], &a);
      grad[i] = a;
    }
    for (int64_t r = 0; r < R; ++r) {
      float qa = 0.f;
      LELP_SIMD_SUM(qa)
      for (int64_t k = 0; k < K; ++k) qa += q[r * K + k] * grad[r * K + k];
      row_qa[r] = qa;
    }
    for (int64_t r = 0; r < R; ++r)
      for (int64_t k = 0; k < K; ++k) grad[r * K + k] = tau * q[r * K + k] * (grad[r * K + k] - row_qa[r]);
  }
  for (int64_t r = 0; r < R && !kl; ++r) {
    float d = 0.f;
    LELP_SIMD_SUM(d)
    for (int64_t k = 0; k < K; ++k) d += log_q[r * K + k];
    loss[r] = tau * tau * d;
  }

  if (alpha != 0.f && labels != nullptr && !(kl && hard_label_folds(tau)))  // t, row_inv, row_log are free now
    hard_label_term(R, K, s, C, S, alpha, labels, t, row_m, row_inv, row_log, grad, loss, hard);
}

}  // namespace lelp
