// The kernels' argument structs from the raw addresses, shapes and scalars the Python layer passes
// (shared by the extension's bindings and the tests' host build of the CUDA kernels).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <tuple>
#include <vector>

#include "cpu/loss.h"
#include "cpu/targets.h"

namespace lelp {

inline TargetsArgs make_targets_args(uintptr_t emb, int emb_dtype, int64_t emb_stride, int64_t n,
                                    int64_t d, uintptr_t weight, uintptr_t bias, int64_t J,
                                    uintptr_t logits, int logits_dtype, int64_t logits_stride,
                                    int64_t C, int64_t S, double beta, double tau, uintptr_t out,
                                    int out_dtype, int64_t out_stride) {
  TargetsArgs a;
  a.embeddings = reinterpret_cast<const void*>(emb);
  a.emb_dtype = emb_dtype;
  a.emb_stride = emb_stride;
  a.n = n;
  a.d = d;
  a.weight = reinterpret_cast<const float*>(weight);
  a.bias = reinterpret_cast<const float*>(bias);
  a.J = J;
  a.logits = reinterpret_cast<const void*>(logits);
  a.logits_dtype = logits_dtype;
  a.logits_stride = logits_stride;
  a.C = C;
  a.S = S;
  a.inv_beta = static_cast<float>(1.0 / beta);
  a.inv_tau = static_cast<float>(1.0 / tau);
  a.out = reinterpret_cast<void*>(out);
  a.out_dtype = out_dtype;
  a.out_stride = out_stride;
  return a;
}

inline LossArgs make_loss_args(uintptr_t student, int student_dtype, int64_t student_stride, int64_t n,
                              int64_t C, int64_t S, uintptr_t log_targets, int targets_dtype,
                              int64_t targets_stride, int64_t n_teachers, uintptr_t weights,
                              uintptr_t labels, int64_t ignore_index, int divergence, double jsd_beta,
                              double tau, double alpha, uintptr_t loss_rows, uintptr_t hard_rows,
                              uintptr_t grad, const TargetsArgs* online) {
  return LossArgs{reinterpret_cast<const void*>(student), student_dtype, student_stride, n, C, S,
                        reinterpret_cast<const void*>(log_targets), targets_dtype, targets_stride,
                        n_teachers, reinterpret_cast<const float*>(weights), online,
                        reinterpret_cast<const int64_t*>(labels), ignore_index, divergence,
                        static_cast<float>(jsd_beta), static_cast<float>(tau), static_cast<float>(alpha),
                        reinterpret_cast<float*>(loss_rows), reinterpret_cast<float*>(hard_rows),
                        reinterpret_cast<float*>(grad)};
}

// One online teacher of the loss: (embeddings, dtype, row stride, d, fused weight, fused bias, J,
// teacher logits, dtype, row stride, beta).
using OnlineTeacher = std::tuple<uintptr_t, int, int64_t, int64_t, uintptr_t, uintptr_t, int64_t, uintptr_t, int,
                                 int64_t, double>;

// The online teachers of the loss, one TargetsArgs each (no output: the loss consumes the targets).
inline std::vector<TargetsArgs> make_online_teachers(const std::vector<OnlineTeacher>& teachers, int64_t n, int64_t C,
                                                     int64_t S, double tau, int64_t n_teachers) {
  std::vector<TargetsArgs> online;
  for (const auto& t : teachers) {
    const auto [emb, emb_dtype, emb_stride, d, weight, bias, J, logits, logits_dtype, logits_stride, beta] = t;
    online.push_back(make_targets_args(emb, emb_dtype, emb_stride, n, d, weight, bias, J, logits, logits_dtype,
                                       logits_stride, C, S, beta, tau, 0, 0, 0));
  }
  if (!online.empty() && static_cast<int64_t>(online.size()) != n_teachers)
    throw std::invalid_argument("loss: one online teacher per mixing weight column is required");
  return online;
}

}  // namespace lelp
