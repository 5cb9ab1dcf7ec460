// pybind11 module lelp_fast._C. Takes raw addresses (tensor.data_ptr()) plus
// shapes and strides: the extension is not built against libtorch, and the
// Python layer validates every argument before calling in.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <tuple>
#include <vector>

#include "cpu/gather.h"
#include "cpu/sketch.h"
#include "cpu/loss.h"
#include "cpu/targets.h"
#include "make_args.h"

namespace py = pybind11;


void loss_binding(uintptr_t student, int student_dtype, int64_t student_stride, int64_t n, int64_t C, int64_t S,
                  uintptr_t log_targets, int targets_dtype, int64_t targets_stride, int64_t n_teachers,
                  uintptr_t weights, uintptr_t labels, int64_t ignore_index, int divergence, double jsd_beta,
                  double tau, double alpha, uintptr_t loss_rows, uintptr_t hard_rows, uintptr_t grad,
                  const std::vector<lelp::OnlineTeacher>& teachers, bool on_cuda, uintptr_t stream,
                  uintptr_t suspect, int grad_dtype, uintptr_t grad_scale, double subclass_weight) {
  const std::vector<lelp::TargetsArgs> online = lelp::make_online_teachers(teachers, n, C, S, tau, n_teachers);
  lelp::LossArgs a = lelp::make_loss_args(student, student_dtype, student_stride, n, C, S, log_targets,
                                          targets_dtype, targets_stride, n_teachers, weights, labels, ignore_index,
                                          divergence, jsd_beta, tau, alpha, loss_rows, hard_rows, grad,
                                          online.empty() ? nullptr : online.data());
  a.grad_dtype = grad_dtype;
  a.grad_scale = reinterpret_cast<const float*>(grad_scale);
  a.subclass_weight = static_cast<float>(subclass_weight);
  if (a.subclass_weight != 1.f && divergence != 0)
    throw std::invalid_argument("loss: subclass_weight != 1 needs divergence KL");
  if (on_cuda) {
#ifdef LELP_WITH_CUDA
    if (suspect != 0) throw std::invalid_argument("loss: the fused input check is CPU only");
    // the CUDA kernel stores its gradient unconditionally (a branch cost every path; ops/loss.py)
    if (grad == 0) throw std::invalid_argument("loss: grad = 0 (forward only) is CPU only; pass scratch");
    lelp::loss_cuda(a, reinterpret_cast<void*>(stream));
    return;
#else
    throw std::invalid_argument("lelp_fast._C was built without CUDA");
#endif
  }
  a.suspect = reinterpret_cast<uint8_t*>(suspect);
  py::gil_scoped_release release;
  lelp::loss_cpu(a);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "lelp_fast compiled kernels (CPU/OpenMP, optional CUDA)";
  m.def(
      "targets_cpu",
      [](uintptr_t emb, int emb_dtype, int64_t emb_stride, int64_t n, int64_t d, uintptr_t weight,
         uintptr_t bias, int64_t J, uintptr_t logits, int logits_dtype, int64_t logits_stride,
         int64_t C, int64_t S, double beta, double tau, uintptr_t out, int out_dtype,
         int64_t out_stride, uintptr_t nonfinite) {
        auto a = lelp::make_targets_args(emb, emb_dtype, emb_stride, n, d, weight, bias, J, logits,
                                   logits_dtype, logits_stride, C, S, beta, tau, out, out_dtype,
                                   out_stride);
        a.nonfinite = reinterpret_cast<uint8_t*>(nonfinite);
        py::gil_scoped_release release;
        lelp::targets_cpu(a);
      },
      "Fused LELP targets on CPU (raw pointers; see lelp_fast.ops.targets). nonfinite: optional N "
      "uint8 flags of rows whose projection or logits are not finite (0 for none).");
  m.def(
      "bucket_rows_cpu",
      [](uintptr_t src, int src_dtype, int64_t src_stride, int64_t n, int64_t d, uintptr_t labels,
         int64_t num_classes, uintptr_t shift, uintptr_t out, uintptr_t counts, uintptr_t sums,
         uintptr_t nonfinite) {
        lelp::BucketArgs a{reinterpret_cast<const void*>(src), src_dtype, src_stride, n, d,
                           reinterpret_cast<const int64_t*>(labels), num_classes,
                           reinterpret_cast<const float*>(shift), reinterpret_cast<float*>(out),
                           reinterpret_cast<int64_t*>(counts), reinterpret_cast<double*>(sums),
                           reinterpret_cast<uint8_t*>(nonfinite)};
        py::gil_scoped_release release;
        return lelp::bucket_rows_cpu(a);
      },
      "Fit bucketing: rows by class (stable), fp32, minus shift; counts, fp64 sums, NaN flags. "
      "Returns the number of non-finite rows, or -(r+1) for an out-of-range label at row r.");
  m.def(
      "sketch_update_cpu",
      [](uintptr_t x, int64_t n, int64_t d, uintptr_t omega, int64_t kp, uintptr_t y, uintptr_t sumsq) {
        if (kp % lelp::sketch_column_pad() != 0) throw std::invalid_argument("sketch_update_cpu: kp must be a multiple of 8");
        py::gil_scoped_release release;
        lelp::sketch_update_cpu(reinterpret_cast<const float*>(x), n, d, reinterpret_cast<const float*>(omega), kp,
                                reinterpret_cast<double*>(y), reinterpret_cast<double*>(sumsq));
      },
      "Fit sketch update for one class: y (d x kp fp64) += x^T (x omega), sumsq += |x|^2; x n x d fp32, "
      "omega d x kp fp32 (kp a multiple of 8).");
  m.def("loss", &loss_binding,
        "Fused distillation loss: per-row loss and dL/ds on CPU (OpenMP) or CUDA (device pointers and a "
        "cudaStream_t handle); targets precomputed, or online from M teachers (a list of (emb, dtype, stride, d, "
        "weight, bias, J, logits, dtype, stride, beta)). `suspect` (CPU only: N uint8 flags) takes the input "
        "check's row flags from the same pass; with `grad_dtype` and `grad_scale` (the address of one fp32, "
        "host or device memory like the tensors) `grad` holds grad_scale * dL/ds in that dtype; `subclass_weight` "
        "(KL) weights the subclass part of KL(t||q); on CPU `grad` = 0 runs it forward only (no gradient). See "
        "lelp_fast.ops.loss.",
        py::arg("student"), py::arg("student_dtype"), py::arg("student_stride"), py::arg("n"), py::arg("C"),
        py::arg("S"), py::arg("log_targets"), py::arg("targets_dtype"), py::arg("targets_stride"),
        py::arg("n_teachers"), py::arg("weights"), py::arg("labels"), py::arg("ignore_index"), py::arg("divergence"),
        py::arg("jsd_beta"), py::arg("tau"), py::arg("alpha"), py::arg("loss_rows"), py::arg("hard_rows"),
        py::arg("grad"), py::arg("teachers"), py::arg("on_cuda"), py::arg("stream"), py::arg("suspect") = 0,
        py::arg("grad_dtype") = 0, py::arg("grad_scale") = 0, py::arg("subclass_weight") = 1.0);
  m.attr("loss_folds_grad") = true;  // the Python layer asks before passing grad_scale
  m.attr("loss_forward_only") = true;  // grad = 0 on CPU: forward only, no gradient written
  m.attr("loss_subclass_weight") = true;  // the CPU and CUDA kernels take lambda (KL): one pass, not two calls
  m.def(
      "scale_rows",
      [](uintptr_t grad, uintptr_t rows, int64_t n, int64_t K, int dtype, uintptr_t out) {
        py::gil_scoped_release release;
        lelp::scale_rows_cpu(reinterpret_cast<const float*>(grad), reinterpret_cast<const float*>(rows), n, K, dtype,
                             reinterpret_cast<void*>(out));
      },
      "out (N x K, dtype code) = grad (N x K fp32) * rows (N fp32), row by row, on CPU.");
  m.def("targets_bf16_isa", &lelp::targets_bf16_isa,
        "The CPU projection of bf16 embeddings: 'avx512bf16' (vdpbf16ps on a hi + lo split map) or cpu_isa().");
  m.def("loss_isa", &lelp::loss_isa, "The CPU loss kernel in use: 'avx512', 'avx2' or 'portable'.");
  m.def("cpu_isa", &lelp::cpu_isa, "The CPU projection kernel in use: 'avx2' or 'portable'.");
#ifdef LELP_WITH_CUDA
  m.attr("has_cuda") = true;
  m.def(
      "targets_cuda",
      [](uintptr_t emb, int emb_dtype, int64_t emb_stride, int64_t n, int64_t d, uintptr_t weight,
         uintptr_t bias, int64_t J, uintptr_t logits, int logits_dtype, int64_t logits_stride,
         int64_t C, int64_t S, double beta, double tau, uintptr_t out, int out_dtype,
         int64_t out_stride, uintptr_t stream, uintptr_t w_hi, uintptr_t w_lo) {
        auto a = lelp::make_targets_args(emb, emb_dtype, emb_stride, n, d, weight, bias, J, logits,
                                   logits_dtype, logits_stride, C, S, beta, tau, out, out_dtype,
                                   out_stride);
        a.w_hi = reinterpret_cast<const void*>(w_hi);
        a.w_lo = reinterpret_cast<const void*>(w_lo);
        lelp::targets_cuda(a, reinterpret_cast<void*>(stream));
      },
      "Fused LELP targets on CUDA (raw device pointers and a cudaStream_t handle); w_hi, w_lo: the "
      "map split for the tensor-core tile (lelp_fast.ops.targets, cuda_tile_split), or 0 for wider maps.");
#else
  m.attr("has_cuda") = false;
#endif
}
