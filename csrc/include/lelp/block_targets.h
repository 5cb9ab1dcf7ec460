// The CUDA targets kernels' bodies (DESIGN.md §1: log t = segmented log-softmaxes of h [A | W^T] + [e | b]).
//
// Tensor-core tile (bf16/fp16 embeddings, J padded to 16 at most kMaxTileCols): a block of 4 warps
// takes 64 rows; for each group of 64 map columns it streams the rows' embeddings and the map through
// shared memory in steps of 32, the map split into hi + lo parts of the embeddings' dtype (two MMAs
// per step keep the projection within fp32-like error), fp32 accumulators. The projections land in
// shared memory, where each warp runs the segmented log-softmaxes of its 16 rows (group_log_targets,
// shared with the loss) and stores them.
// Row kernel (fp32 embeddings or wider maps): a warp per row, lanes over the map's columns.
//
// Written against Block and Mma types as lelp/warp_loss.h is against Warp: csrc/cuda/ supplies
// __syncthreads and WMMA, tests/cuda_emu/ 128 host threads and a plain 16 x 16 x 16 product.
//   Block: thread() (0 .. 127), sync(), Warp (a Warp type of width 32) and warp() (this thread's)
//   Mma:   fragment types A, B, Acc; fill(acc, v); load_a / load_b(frag, const uint16_t*, ld);
//          mma(acc, a, b) (acc += a b); store(warp, float*, acc, ld); to_bits(float) / from_bits
//          (the embeddings' 16-bit dtype)
#pragma once

#include "cpu/targets.h"
#include "lelp/warp_loss.h"

namespace lelp {
namespace tile {

constexpr int kThreads = 128;       // 4 warps
constexpr int kRows = 64;           // rows per block: 16 per warp
constexpr int kStepK = 32;          // embedding columns staged per step
constexpr int kGroupCols = 64;      // map columns per accumulator group: 4 fragments per warp
constexpr int kMaxTileCols = 256;   // widest padded map (J) the tile takes; wider maps use the row kernel
constexpr int kLdX = kStepK + 8;    // shared-memory leading dimensions, padded against bank conflicts and
constexpr int kLdW = kGroupCols + 8;  // kept multiples of 8 (16-bit) / 8 floats so that every
                                      // fragment pointer is 32-byte aligned as WMMA requires

LELP_HD int pad16(int64_t j) { return static_cast<int>((j + 15) / 16 * 16); }

// Floats per row of the projections buffer: the padded map and the class logits after the K projections.
LELP_HD int ld_u(const TargetsArgs& a) {
  const int64_t need = pad16(a.J) > a.C * a.S + a.C ? pad16(a.J) : a.C * a.S + a.C;
  return static_cast<int>((need + 7) / 8 * 8);
}

// Shared-memory bytes of the tile: X and hi/lo map stages (16-bit), the projections (fp32).
LELP_HD int64_t smem_bytes(const TargetsArgs& a) {
  return 2 * (kRows * kLdX + 2 * kStepK * kLdW) + 4 * static_cast<int64_t>(kRows) * ld_u(a);
}

// Whether the tensor-core tile takes this call.
inline bool tile_takes(const TargetsArgs& a) {
  return a.emb_dtype != kFloat32 && pad16(a.J) <= kMaxTileCols && a.C * a.S + a.C <= kMaxTileCols;
}

// Stages rows [row0, row0 + 64) x embedding columns [k0, k0 + 32) (zeros outside) as 16-bit words.
template <class Block>
LELP_DEV void stage_x(const Block& b, const TargetsArgs& a, int64_t row0, int64_t k0, uint16_t* xs) {
  const uint16_t* x = static_cast<const uint16_t*>(a.embeddings);
  for (int i = b.thread(); i < kRows * kStepK; i += kThreads) {
    const int r = i / kStepK, k = i % kStepK;
    const int64_t row = row0 + r, col = k0 + k;
    xs[r * kLdX + k] = row < a.n && col < a.d ? x[row * a.emb_stride + col] : uint16_t{0};
  }
}

// Stages map rows [k0, k0 + 32) x columns [c0, c0 + 64) split as w = hi + lo (zeros outside).
template <class Block, class Mma>
LELP_DEV void stage_w(const Block& b, const TargetsArgs& a, int64_t k0, int c0, uint16_t* wh, uint16_t* wl) {
  for (int i = b.thread(); i < kStepK * kGroupCols; i += kThreads) {
    const int k = i / kGroupCols, c = i % kGroupCols;
    const int64_t row = k0 + k, col = c0 + c;
    const float w = row < a.d && col < a.J ? a.weight[row * a.J + col] : 0.f;
    const uint16_t hi = Mma::to_bits(w);
    wh[k * kLdW + c] = hi;
    wl[k * kLdW + c] = Mma::to_bits(w - Mma::from_bits(hi));
  }
}

// u (64 x ld_u floats) = the tile's projections without the bias, columns [0, pad16(J)).
template <class Block, class Mma>
LELP_DEV void tile_projections(const Block& b, const TargetsArgs& a, int64_t row0, uint16_t* xs, uint16_t* wh,
                               uint16_t* wl, float* u) {
  const int warp = b.thread() / 32, jp = pad16(a.J), ldu = ld_u(a);
  for (int c0 = 0; c0 < jp; c0 += kGroupCols) {  // block-uniform
    const int frags = (jp - c0 < kGroupCols ? jp - c0 : kGroupCols) / 16;
    typename Mma::Acc acc[kGroupCols / 16];
#pragma unroll
    for (int f = 0; f < kGroupCols / 16; ++f) Mma::fill(acc[f], 0.f);
    for (int64_t k0 = 0; k0 < a.d; k0 += kStepK) {
      stage_x(b, a, row0, k0, xs);
      stage_w<Block, Mma>(b, a, k0, c0, wh, wl);
      b.sync();
#pragma unroll
      for (int kk = 0; kk < kStepK; kk += 16) {
        typename Mma::A fa;
        Mma::load_a(fa, xs + warp * 16 * kLdX + kk, kLdX);
#pragma unroll
        for (int f = 0; f < kGroupCols / 16; ++f) {
          if (f >= frags) continue;
          typename Mma::B fb;
          Mma::load_b(fb, wh + kk * kLdW + f * 16, kLdW);
          Mma::mma(acc[f], fa, fb);
          Mma::load_b(fb, wl + kk * kLdW + f * 16, kLdW);
          Mma::mma(acc[f], fa, fb);
        }
      }
      b.sync();  // the next step overwrites the stages
    }
#pragma unroll
    for (int f = 0; f < kGroupCols / 16; ++f)
      if (f < frags) Mma::store(b.warp(), u + warp * 16 * ldu + c0 + f * 16, acc[f], ldu);
  }
  b.sync();
}

// Bias, class logits and log-softmaxes of the warp's 16 rows of u; stores them.
template <class Block>
LELP_DEV void tile_epilogue(const Block& b, const TargetsArgs& a, int64_t row0, float* u) {
  using Warp = typename Block::Warp;
  const Warp w = b.warp();
  const int warp = b.thread() / 32, lane = w.lane(), ldu = ld_u(a);
  const int C = static_cast<int>(a.C), S = static_cast<int>(a.S), K = C * S, J = static_cast<int>(a.J);
  for (int r = warp * 16; r < warp * 16 + 16; ++r) {  // warp-uniform
    const int64_t row = row0 + r;
    float* ur = u + r * ldu;
    for (int j = lane; j < J; j += 32) ur[j] += a.bias[j];
    if (a.logits != nullptr)
      for (int c = lane; c < C; c += 32)
        ur[K + c] = row < a.n ? Warp::load(a.logits, a.logits_dtype, row * a.logits_stride + c) : 0.f;
    w.sync();
    warp::group_log_targets(w, ur, C, S, a.inv_beta, a.inv_tau);
    if (row < a.n)
      for (int k = lane; k < K; k += 32) Warp::store(a.out, a.out_dtype, row * a.out_stride + k, ur[k]);
  }
}

// The tensor-core kernel's body: the block's tiles, grid-stride. smem: smem_bytes(a), 128-byte aligned.
template <class Block, class Mma>
LELP_DEV void targets_tiles(const Block& b, const TargetsArgs& a, char* smem, int64_t block, int64_t n_blocks) {
  uint16_t* xs = reinterpret_cast<uint16_t*>(smem);
  uint16_t* wh = xs + kRows * kLdX;
  uint16_t* wl = wh + kStepK * kLdW;
  float* u = reinterpret_cast<float*>(wl + kStepK * kLdW);  // offset 2 * (2560 + 2 * 2304) bytes: 32-aligned
  for (int64_t row0 = block * kRows; row0 < a.n; row0 += n_blocks * kRows) {  // block-uniform
    tile_projections<Block, Mma>(b, a, row0, xs, wh, wl, u);
    tile_epilogue(b, a, row0, u);
    b.sync();  // the next tile overwrites u
  }
}

// The row kernel's body: a warp per row (grid-stride); u: the warp's K + C floats of shared memory.
template <class Warp>
LELP_DEV void targets_rows(const Warp& w, const TargetsArgs& a, float* u, int64_t warp_id, int64_t n_warps) {
  const int C = static_cast<int>(a.C), S = static_cast<int>(a.S);
  for (int64_t row = warp_id; row < a.n; row += n_warps) {  // warp-uniform
    warp::group_row_targets(w, a, row, true, C, S, a.inv_tau, u);
    for (int k = w.lane(); k < C * S; k += 32) Warp::store(a.out, a.out_dtype, row * a.out_stride + k, u[k]);
    w.sync();  // the next row overwrites u
  }
}

}  // namespace tile
}  // namespace lelp
