// Row math of the distillation loss, shared by the CPU and CUDA kernels.
//
// For one row with student logits s (K), log-targets log t (K), q = softmax(s / tau):
//   L = tau^2 * D(t, q) + alpha * CE(y, logsumexp-pool(s))           (DESIGN.md §1)
// and its gradient with respect to s, both in fp32. Every divergence is computed
// from log-probabilities, so huge logits and tiny beta give finite values:
//   KL(t||q)   dL/ds_k = tau (q_k - t_k)
//   others     dD/dq_j = a_j  =>  dL/ds_k = tau q_k (a_k - sum_j q_j a_j)
//   reverse KL a = log q - log t + 1 (the +1 cancels), JS a = (log q - log m) / 2,
//   TVD        a = sign(q - t) / 2.
#pragma once

#include "lelp/row_math.h"

namespace lelp {

enum Divergence : int { kKL = 0, kReverseKL = 1, kJS = 2, kTVD = 3 };

// t * (log t - log x) with the convention 0 * log 0 = 0 (a target of exactly 0).
LELP_HD float xlogx_ratio(float t, float log_t, float log_x) {
  return t > 0.f ? t * (log_t - log_x) : 0.f;
}

LELP_HD float logaddexp_(float a, float b) {
  const float m = fmax_(a, b);
  if (m == -INFINITY) return -INFINITY;
  return m + logf(expf(a - m) + expf(b - m));
}

// Loss of one row; writes dL/ds into grad (K). log_q is K floats of scratch.
// label < 0 means no hard-label term for this row.
LELP_HD float row_loss_grad(const float* s, const float* log_t, int C, int S, int divergence,
                            float tau, float alpha, int label, float* log_q, float* grad) {
  const int K = C * S;
  const float inv_tau = 1.f / tau;
  const float lse = scaled_logsumexp(s, K, 1, inv_tau);
  for (int k = 0; k < K; ++k) log_q[k] = s[k] * inv_tau - lse;

  float d = 0.f;
  if (divergence == kKL) {
    for (int k = 0; k < K; ++k) {
      const float t = expf(log_t[k]);
      d += xlogx_ratio(t, log_t[k], log_q[k]);
      grad[k] = tau * (expf(log_q[k]) - t);
    }
  } else {
    // a_k = dD/dq_k; then the softmax Jacobian: grad_k = tau q_k (a_k - sum_j q_j a_j).
    float qa = 0.f;
    for (int k = 0; k < K; ++k) {
      const float q = expf(log_q[k]);
      const float t = expf(log_t[k]);
      float a;
      if (divergence == kReverseKL) {
        const float r = log_q[k] - log_t[k];
        d += q > 0.f ? q * r : 0.f;
        a = q > 0.f ? r : 0.f;
      } else if (divergence == kJS) {
        const float log_m = logaddexp_(log_t[k], log_q[k]) - 0.6931471805599453f;
        d += 0.5f * (xlogx_ratio(t, log_t[k], log_m) + xlogx_ratio(q, log_q[k], log_m));
        a = q > 0.f ? 0.5f * (log_q[k] - log_m) : 0.f;
      } else {  // TVD
        d += 0.5f * fabsf(t - q);
        a = q > t ? 0.5f : (q < t ? -0.5f : 0.f);
      }
      grad[k] = a;
      qa += q * a;
    }
    for (int k = 0; k < K; ++k) grad[k] = tau * expf(log_q[k]) * (grad[k] - qa);
  }
  float loss = tau * tau * d;

  if (alpha != 0.f && label >= 0) {
    // Pooled class logits p_c = logsumexp_s s_{c,s}; CE = logsumexp_c p_c - p_y.
    // dCE/ds_k = softmax(s)_k - [class(k) = y] * softmax_within_y(s)_k.
    float lse_all = scaled_logsumexp(s, K, 1, 1.f);
    const float p_y = scaled_logsumexp(s + label * S, S, 1, 1.f);
    loss += alpha * (lse_all - p_y);
    for (int k = 0; k < K; ++k) {
      float g = expf(s[k] - lse_all);
      if (k / S == label) g -= expf(s[k] - p_y);
      grad[k] += alpha * g;
    }
  }
  return loss;
}

}  // namespace lelp
