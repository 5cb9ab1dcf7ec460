// Python module lelp_cuda_emu (tests only): the CUDA kernels' bodies run on the host (emulate.h)
// behind the signatures of lelp_fast._C's loss and targets_cuda, so tests run them through
// lelp_fast's Python layer on CPU tensors and compare with the reference (see tests/conftest.py).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstring>
#include <string>

#include "emulate.h"
#include "make_args.h"

namespace py = pybind11;

namespace {

float load_value(const void* base, int dtype, int64_t i) {
  const uint16_t* p = static_cast<const uint16_t*>(base);
  if (dtype == lelp::kFloat32) return static_cast<const float*>(base)[i];
  if (dtype == lelp::kBFloat16) return lelp::bf16_bits_to_float(p[i]);
  _Float16 h;
  std::memcpy(&h, p + i, 2);
  return static_cast<float>(h);
}

// The CPU kernel's row flags (csrc/cpu/loss.h, LossArgs::suspect), by a plain host loop.
void flag_rows(const lelp::LossArgs& a, uint8_t* suspect) {
  const int64_t K = a.C * a.S;
  for (int64_t row = 0; row < a.n; ++row) {
    float s_sum = 0.f;
    for (int64_t k = 0; k < K; ++k) s_sum += load_value(a.student, a.student_dtype, row * a.student_stride + k);
    bool t_suspect = false;
    for (int64_t m = 0; a.online == nullptr && m < a.n_teachers; ++m) {
      float t_sum = 0.f;
      for (int64_t k = 0; k < K; ++k)
        t_sum += load_value(a.log_targets, a.targets_dtype, row * a.targets_stride + m * K + k);
      t_suspect |= !(t_sum <= 0.f);
    }
    suspect[row] = static_cast<uint8_t>(!std::isfinite(s_sum) | (t_suspect << 1));
  }
}

}  // namespace

PYBIND11_MODULE(lelp_cuda_emu, m) {
  m.def("tile_takes", [](int emb_dtype, int64_t J, int64_t C, int64_t S) {
    lelp::TargetsArgs a{};
    a.emb_dtype = emb_dtype;
    a.J = J;
    a.C = C;
    a.S = S;
    return lelp::tile::tile_takes(a);
  });
  m.def(
      "tile_smem_bytes",
      [](int emb_bytes, int64_t J, int64_t C, int64_t S, bool vec, int64_t smem_per_sm) {
        lelp::TargetsArgs a{};
        a.J = J;
        a.C = C;
        a.S = S;
        return lelp::tile::smem_bytes(a, emb_bytes, lelp::tile::streaming_row_frags(a, emb_bytes, vec, smem_per_sm));
      },
      pybind11::arg("emb_bytes"), pybind11::arg("J"), pybind11::arg("C"), pybind11::arg("S"),
      pybind11::arg("vec") = true, pybind11::arg("smem_per_sm") = lelp::tile::kSm90SmemPerSm);
  m.def("resident_smem_bytes", [](int emb_bytes, int64_t d, int64_t J, int64_t C, int64_t S) {
    lelp::TargetsArgs a{};
    a.d = d;
    a.J = J;
    a.C = C;
    a.S = S;
    return lelp::tile::resident_smem_bytes(a, emb_bytes);
  });
  // The emulated device's opt-in shared-memory limit, which picks the tile's form (0: always streaming).
  m.def("set_smem_optin_bytes", [](int64_t bytes) { lelp::emu::smem_optin_bytes = bytes; });
  m.def("smem_optin_bytes", [] { return lelp::emu::smem_optin_bytes; });
  m.def("last_targets_form", [] { return std::string(lelp::emu::last_targets_form); });
  m.def("last_tile_rows", [] { return lelp::emu::last_tile_rows; });
  // The emulated device's shared memory per SM (sm_90's), which the streaming tile's 128-row form must fit twice.
  m.def("set_smem_per_sm_bytes", [](int64_t bytes) { lelp::emu::smem_per_sm_bytes = bytes; });
  m.def("smem_per_sm_bytes", [] { return lelp::emu::smem_per_sm_bytes; });
  m.def("split_layout", [](int64_t d, int64_t J) { return std::make_pair(lelp::tile::split_rows(d), lelp::tile::split_cols(J)); });
  // targets_cuda's signature: w_hi, w_lo are the caller's split map for the tile (0 for the row kernel).
  m.def("targets", [](uintptr_t emb, int emb_dtype, int64_t emb_stride, int64_t n, int64_t d, uintptr_t weight,
                      uintptr_t bias, int64_t J, uintptr_t logits, int logits_dtype, int64_t logits_stride, int64_t C,
                      int64_t S, double beta, double tau, uintptr_t out, int out_dtype, int64_t out_stride,
                      uintptr_t /*stream*/, uintptr_t w_hi, uintptr_t w_lo) {
    auto a = lelp::make_targets_args(emb, emb_dtype, emb_stride, n, d, weight, bias, J, logits, logits_dtype,
                                     logits_stride, C, S, beta, tau, out, out_dtype, out_stride);
    a.w_hi = reinterpret_cast<const void*>(w_hi);
    a.w_lo = reinterpret_cast<const void*>(w_lo);
    py::gil_scoped_release release;
    lelp::emu::targets(a);
  });
  // The trailing `suspect` (N uint8 flags of the CPU kernel's fused input check; 0 for none) is
  // filled here by a host loop with the CPU kernel's rule, so that the Python check path runs the
  // same under emulation; the CUDA loss itself has no check.
  m.def("loss", [](uintptr_t student, int student_dtype, int64_t student_stride, int64_t n, int64_t C, int64_t S,
                   uintptr_t log_targets, int targets_dtype, int64_t targets_stride, int64_t n_teachers,
                   uintptr_t weights, uintptr_t labels, int64_t ignore_index, int divergence, double jsd_beta,
                   double tau, double alpha, uintptr_t loss_rows, uintptr_t hard_rows, uintptr_t grad,
                   const std::vector<lelp::OnlineTeacher>& teachers, bool /*on_cuda*/, uintptr_t /*stream*/,
                   uintptr_t suspect, int grad_dtype, uintptr_t grad_scale, double subclass_weight) {
    const auto online = lelp::make_online_teachers(teachers, n, C, S, tau, n_teachers);
    auto a = lelp::make_loss_args(student, student_dtype, student_stride, n, C, S, log_targets, targets_dtype,
                                        targets_stride, n_teachers, weights, labels, ignore_index, divergence,
                                        jsd_beta, tau, alpha, loss_rows, hard_rows, grad,
                                        online.empty() ? nullptr : online.data());
    a.grad_dtype = grad_dtype;
    a.grad_scale = reinterpret_cast<const float*>(grad_scale);
    a.subclass_weight = static_cast<float>(subclass_weight);
    py::gil_scoped_release release;
    if (suspect != 0) flag_rows(a, reinterpret_cast<uint8_t*>(suspect));
    lelp::emu::loss(a);
  }, py::arg("student"), py::arg("student_dtype"), py::arg("student_stride"), py::arg("n"), py::arg("C"), py::arg("S"),
     py::arg("log_targets"), py::arg("targets_dtype"), py::arg("targets_stride"), py::arg("n_teachers"),
     py::arg("weights"), py::arg("labels"), py::arg("ignore_index"), py::arg("divergence"), py::arg("jsd_beta"),
     py::arg("tau"), py::arg("alpha"), py::arg("loss_rows"), py::arg("hard_rows"), py::arg("grad"),
     py::arg("teachers"), py::arg("on_cuda"), py::arg("stream"), py::arg("suspect") = 0,
     py::arg("grad_dtype") = 0, py::arg("grad_scale") = 0, py::arg("subclass_weight") = 1.0);
}
