// The CUDA targets kernels' bodies (docs/algorithm.md: log t = segmented log-softmaxes of h [A | W^T] + [e | b]).
//
// Tensor-core tile (maps up to kMaxTileCols columns): a block of 4 warps takes 64 rows; for each
// group of 64 map columns it streams the rows' embeddings and the map through shared memory in
// steps of 32 columns, and accumulates in fp32:
//   bf16/fp16 embeddings: the fp32 map split into hi + lo parts of the embeddings' dtype, two
//     16x16x16 MMAs per step (the embeddings are exact in their dtype);
//   fp32 embeddings: both sides split into TF32 hi + lo, three 16x16x8 MMAs (hi*hi + hi*lo + lo*hi),
//     fp32-like error with fp32's range.
// The projections land in shared memory, where each warp runs the segmented log-softmaxes of its
// 16 rows (group_log_targets, shared with the loss) and stores them.
// Row kernel (wider maps): a warp per row, lanes over the map's columns.
//
// Written against Block and Mma types as lelp/warp_loss.h is against Warp: csrc/cuda/ supplies
// __syncthreads and WMMA, tests/cuda_emu/ 128 host threads and plain products of whole tiles.
//   Block: thread() (0 .. 127), sync(), Warp (a Warp type of width 32) and warp() (this thread's)
//   Mma:   Stage (shared-memory element: 16-bit words or float), kK (the MMA's k), kSplitX (the
//          embeddings are split too), kVec (embedding elements per 16-byte load);
//          split_x(const void* emb, int64_t i, Stage* hi, Stage* lo) (one element),
//          split_x_vec(same, kVec elements from a 16-byte aligned address), split_w(float, Stage* hi,
//          Stage* lo); fragment types A, B, Acc; fill(acc, v); load_a / load_b(frag, const Stage*, ld);
//          mma(acc, a, b) (acc += a b); store(warp, float*, acc, ld)
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
constexpr int kLdX = kStepK + 8;    // shared-memory leading dimensions (elements), padded against bank
constexpr int kLdW = kGroupCols + 8;  // conflicts and kept multiples of 8 so that every fragment
                                      // pointer is 32-byte aligned as WMMA requires

LELP_HD int pad16(int64_t j) { return static_cast<int>((j + 15) / 16 * 16); }

// Floats per row of the projections buffer: the padded map and the class logits after the K projections.
LELP_HD int ld_u(const TargetsArgs& a) {
  const int64_t need = pad16(a.J) > a.C * a.S + a.C ? pad16(a.J) : a.C * a.S + a.C;
  return static_cast<int>((need + 7) / 8 * 8);
}

// Shared-memory bytes of the tile: the embedding stage (hi, and lo when split), the map's hi and lo
// stages, the projections (fp32). stage_bytes: 2 (bf16/fp16) or 4 (fp32, split).
LELP_HD int64_t smem_bytes(const TargetsArgs& a, int stage_bytes) {
  const int x_stages = stage_bytes == 4 ? 2 : 1;
  return static_cast<int64_t>(stage_bytes) * (x_stages * kRows * kLdX + 2 * kStepK * kLdW) +
         4 * static_cast<int64_t>(kRows) * ld_u(a);
}

// Whether the tensor-core tile takes this call.
inline bool tile_takes(const TargetsArgs& a) {
  return pad16(a.J) <= kMaxTileCols && a.C * a.S + a.C <= kMaxTileCols;
}

// Whether every embedding row starts 16-byte aligned, so that the stage can load 16 bytes at a time.
inline bool tile_vector_loads(const TargetsArgs& a) {
  const int64_t elem = a.emb_dtype == kFloat32 ? 4 : 2;
  return reinterpret_cast<uintptr_t>(a.embeddings) % 16 == 0 && (a.emb_stride * elem) % 16 == 0;
}

// Stages rows [row0, row0 + 64) x embedding columns [k0, k0 + 32) (zeros outside), split as Mma says.
template <class Block, class Mma>
LELP_DEV void stage_x(const Block& b, const TargetsArgs& a, int64_t row0, int64_t k0, bool vec,
                      typename Mma::Stage* xh, typename Mma::Stage* xl) {
  constexpr int V = Mma::kVec;
  for (int i = b.thread(); i < kRows * kStepK / V; i += kThreads) {
    const int r = i / (kStepK / V), k = i % (kStepK / V) * V;
    const int64_t row = row0 + r, col = k0 + k;
    const int at = r * kLdX + k;
    if (vec && row < a.n && col + V <= a.d) {
      Mma::split_x_vec(a.embeddings, row * a.emb_stride + col, xh + at, xl + at);
      continue;
    }
    for (int e = 0; e < V; ++e) {
      if (row < a.n && col + e < a.d) {
        Mma::split_x(a.embeddings, row * a.emb_stride + col + e, xh + at + e, xl + at + e);
      } else {
        xh[at + e] = typename Mma::Stage{0};
        if constexpr (Mma::kSplitX) xl[at + e] = typename Mma::Stage{0};
      }
    }
  }
}

// Stages map rows [k0, k0 + 32) x columns [c0, c0 + cols) split as w = hi + lo (zeros outside the map).
template <class Block, class Mma>
LELP_DEV void stage_w(const Block& b, const TargetsArgs& a, int64_t k0, int c0, int cols, typename Mma::Stage* wh,
                      typename Mma::Stage* wl) {
  for (int i = b.thread(); i < kStepK * cols; i += kThreads) {
    const int k = i / cols, c = i % cols;
    const int64_t row = k0 + k, col = c0 + c;
    const float w = row < a.d && col < a.J ? a.weight[row * a.J + col] : 0.f;
    Mma::split_w(w, wh + k * kLdW + c, wl + k * kLdW + c);
  }
}

// The staged step's products into the warp's accumulators (frags of them are live).
template <class Mma>
LELP_DEV void step_products(int warp, int frags, const typename Mma::Stage* xh, const typename Mma::Stage* xl,
                            const typename Mma::Stage* wh, const typename Mma::Stage* wl, typename Mma::Acc* acc) {
#pragma unroll
  for (int kk = 0; kk < kStepK; kk += Mma::kK) {
    typename Mma::A ah, al;
    Mma::load_a(ah, xh + warp * 16 * kLdX + kk, kLdX);
    if constexpr (Mma::kSplitX) Mma::load_a(al, xl + warp * 16 * kLdX + kk, kLdX);
#pragma unroll
    for (int f = 0; f < kGroupCols / 16; ++f) {
      if (f >= frags) continue;
      typename Mma::B bh, bl;
      Mma::load_b(bh, wh + kk * kLdW + f * 16, kLdW);
      Mma::load_b(bl, wl + kk * kLdW + f * 16, kLdW);
      Mma::mma(acc[f], ah, bh);
      Mma::mma(acc[f], ah, bl);
      if constexpr (Mma::kSplitX) Mma::mma(acc[f], al, bh);  // x_lo * w_lo is below fp32's resolution
    }
  }
}

// u (64 x ld_u floats) = the tile's projections without the bias, columns [0, pad16(J)).
template <class Block, class Mma>
LELP_DEV void tile_projections(const Block& b, const TargetsArgs& a, int64_t row0, bool vec, typename Mma::Stage* stages,
                               float* u) {
  using Stage = typename Mma::Stage;
  Stage* xh = stages;
  Stage* xl = xh + kRows * kLdX;  // used when Mma::kSplitX
  Stage* wh = xl + (Mma::kSplitX ? kRows * kLdX : 0);
  Stage* wl = wh + kStepK * kLdW;
  const int warp = b.thread() / 32, jp = pad16(a.J), ldu = ld_u(a);
  for (int c0 = 0; c0 < jp; c0 += kGroupCols) {  // block-uniform
    const int frags = (jp - c0 < kGroupCols ? jp - c0 : kGroupCols) / 16;
    typename Mma::Acc acc[kGroupCols / 16];
#pragma unroll
    for (int f = 0; f < kGroupCols / 16; ++f) Mma::fill(acc[f], 0.f);
    for (int64_t k0 = 0; k0 < a.d; k0 += kStepK) {
      stage_x<Block, Mma>(b, a, row0, k0, vec, xh, xl);
      stage_w<Block, Mma>(b, a, k0, c0, frags * 16, wh, wl);  // only the group's fragments are read
      b.sync();
      step_products<Mma>(warp, frags, xh, xl, wh, wl, acc);
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

// The tensor-core kernel's body: the block's tiles, grid-stride. smem: smem_bytes(a, sizeof(Stage)),
// 128-byte aligned; vec: tile_vector_loads(a).
template <class Block, class Mma>
LELP_DEV void targets_tiles(const Block& b, const TargetsArgs& a, char* smem, int64_t block, int64_t n_blocks, bool vec) {
  using Stage = typename Mma::Stage;
  Stage* stages = reinterpret_cast<Stage*>(smem);
  // The stages' sizes are multiples of 32 bytes, so u is aligned for WMMA stores.
  float* u = reinterpret_cast<float*>(smem + sizeof(Stage) * ((Mma::kSplitX ? 2 : 1) * kRows * kLdX + 2 * kStepK * kLdW));
  for (int64_t row0 = block * kRows; row0 < a.n; row0 += n_blocks * kRows) {  // block-uniform
    tile_projections<Block, Mma>(b, a, row0, vec, stages, u);
    tile_epilogue(b, a, row0, u);
    b.sync();  // the next tile overwrites u
  }
}

// The row kernel's body: a warp per row (grid-stride); u: the warp's K + C floats of shared memory.
template <class Warp>
LELP_DEV void targets_rows(const Warp& w, const TargetsArgs& a, float* u, int64_t warp_id, int64_t n_warps) {
  const int C = static_cast<int>(a.C), S = static_cast<int>(a.S);
  for (int64_t row = warp_id; row < a.n; row += n_warps) {  // warp-uniform
    warp::group_row_targets(w, a, row, true, C, S, u);
    for (int k = w.lane(); k < C * S; k += 32) Warp::store(a.out, a.out_dtype, row * a.out_stride + k, u[k]);
    w.sync();  // the next row overwrites u
  }
}

}  // namespace tile
}  // namespace lelp
