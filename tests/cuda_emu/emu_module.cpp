// Python module lelp_cuda_emu (tests only): the CUDA kernels' bodies run on the host (emulate.h)
// behind the signatures of lelp_fast._C's loss and targets_cpu, so tests run them through
// lelp_fast's Python layer on CPU tensors and compare with the reference (see tests/conftest.py).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "emulate.h"
#include "make_args.h"

namespace py = pybind11;

PYBIND11_MODULE(lelp_cuda_emu, m) {
  m.def("tile_takes", [](int emb_dtype, int64_t J, int64_t C, int64_t S) {
    lelp::TargetsArgs a{};
    a.emb_dtype = emb_dtype;
    a.J = J;
    a.C = C;
    a.S = S;
    return lelp::tile::tile_takes(a);
  });
  m.def("targets", [](uintptr_t emb, int emb_dtype, int64_t emb_stride, int64_t n, int64_t d, uintptr_t weight,
                      uintptr_t bias, int64_t J, uintptr_t logits, int logits_dtype, int64_t logits_stride, int64_t C,
                      int64_t S, double beta, double tau, uintptr_t out, int out_dtype, int64_t out_stride,
                      uintptr_t nonfinite) {
    const auto a = lelp::make_targets_args(emb, emb_dtype, emb_stride, n, d, weight, bias, J, logits, logits_dtype,
                                           logits_stride, C, S, beta, tau, out, out_dtype, out_stride);
    py::gil_scoped_release release;
    lelp::emu::targets(a, reinterpret_cast<uint8_t*>(nonfinite));
  });
  m.def("loss", [](uintptr_t student, int student_dtype, int64_t student_stride, int64_t n, int64_t C, int64_t S,
                   uintptr_t log_targets, int targets_dtype, int64_t targets_stride, int64_t n_teachers,
                   uintptr_t weights, uintptr_t labels, int64_t ignore_index, int divergence, double jsd_beta,
                   double tau, double alpha, uintptr_t loss_rows, uintptr_t hard_rows, uintptr_t grad,
                   const std::vector<lelp::OnlineTeacher>& teachers, bool /*on_cuda*/, uintptr_t /*stream*/) {
    const auto online = lelp::make_online_teachers(teachers, n, C, S, tau, n_teachers);
    const auto a = lelp::make_loss_args(student, student_dtype, student_stride, n, C, S, log_targets, targets_dtype,
                                        targets_stride, n_teachers, weights, labels, ignore_index, divergence,
                                        jsd_beta, tau, alpha, loss_rows, hard_rows, grad,
                                        online.empty() ? nullptr : online.data());
    py::gil_scoped_release release;
    lelp::emu::loss(a);
  });
}
