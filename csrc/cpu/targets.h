#pragma once

#include <cstdint>
#include <vector>

namespace lelp {

// Arguments of the fused targets op, shared by the CPU and CUDA entry points.
// Pointers are raw device/host addresses; strides are in elements; the last
// dimension of every matrix is contiguous.
struct TargetsArgs {
  const void* embeddings;   // N x d, dtype emb_dtype
  int emb_dtype;
  int64_t emb_stride;
  int64_t n, d;
  const float* weight;      // d x J fp32, row-major: [A | W^T]
  const float* bias;        // J fp32: [e | b]
  int64_t J;                // K, or K + C when the class logits come from the head
  const void* logits;       // N x C teacher logits (dtype logits_dtype) or nullptr
  int logits_dtype;
  int64_t logits_stride;
  int64_t C, S;
  float inv_beta, inv_tau;
  void* out;                // N x K, dtype out_dtype
  int out_dtype;
  int64_t out_stride;
  uint8_t* nonfinite = nullptr;  // optional N flags: row's projection (or logits) not finite (CPU only)
  // CUDA tensor-core tile only: the map split once by the caller (lelp_fast/ops/targets.py, cached)
  // into hi + lo parts of the tile's stage type (bf16/fp16 for 16-bit embeddings, TF32-rounded fp32
  // for fp32), each tile::split_rows(d) x tile::split_cols(J), zero-padded, row-major.
  const void* w_hi = nullptr;
  const void* w_lo = nullptr;
};

void targets_cpu(const TargetsArgs& a);

// Per-thread scratch of the targets tile: the padded fused map and tile buffers.
struct TargetsWorkspace {
  explicit TargetsWorkspace(const TargetsArgs& a);
  int64_t jp;
  std::vector<float> weight, bias, x, acc, z;
  std::vector<uint16_t> w_hi, w_lo, xb;  // bf16 embeddings on AVX512-BF16: the split map, the tile's rows
};
// Rows per tile, and the fp32 log-targets of rows [r0, r0 + tile rows) into log_t (rows x K).
int64_t targets_tile_rows();
void targets_tile(const TargetsArgs& a, int64_t r0, TargetsWorkspace& ws, float* log_t);
// "avx2" or "portable": the projection kernel this process runs on CPU.
const char* cpu_isa();
// "avx512bf16" where bf16 embeddings take the vdpbf16ps projection (hi + lo split map), else cpu_isa().
// LELP_FAST_CPU_ISA=avx2 or =portable turns it off.
const char* targets_bf16_isa();
#ifdef LELP_WITH_CUDA
void targets_cuda(const TargetsArgs& a, void* stream);
#endif

}  // namespace lelp
