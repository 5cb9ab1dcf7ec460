// The CUDA targets kernels' bodies (docs/algorithm.md: log t = segmented log-softmaxes of h [A | W^T] + [e | b]).
//
// Tensor-core tile (maps up to kMaxTileCols columns): a block of 8 warps takes 64 rows (128 for
// embeddings in 16-byte rows at maps of up to kPairedMaxCols columns) and streams their
// embeddings once, in steps of 32 columns, against the whole map (every column's accumulator stays
// live: warp w takes row fragment w % 4 (or 2 (w % 4) and the next) and every other 16-column
// fragment, so at most 8 fragments per warp, 2 x 5 in 128-row tiles). The map comes split once by
// the caller (TargetsArgs::w_hi / w_lo, cached per projector in lelp_fast/ops/targets.py), so every
// step is a plain copy: asynchronous, two stages in flight (the next step's copies overlap this
// step's products). Products accumulate in fp32:
//   bf16/fp16 embeddings: the fp32 map as hi + lo parts of the embeddings' dtype, two 16x16x16 MMAs
//     per k slice (the embeddings are exact in their dtype);
//   fp32 embeddings: the map as bf16 hi + lo parts, and each step's embeddings, once landed, split
//     in shared memory into bf16 hi + lo (Mma::split8), three 16x16x16 MMAs (hi*hi + hi*lo +
//     lo*hi; lo*lo is below 2^-16 of a term): errors of ~2^-16 of a product's terms, as the Triton
//     kernel's fp32 path, at bf16's tensor-core rate and 2 bytes a map entry (the TF32 hi + lo form
//     before took 4, and twice the k slices).
// The projections land in shared memory (over the stages), where each warp runs the segmented
// log-softmaxes of its 8 (or 16) rows (lanes over (row, class) pairs; lelp::row_log_targets' math)
// and stores them.
// Resident form (when the split map and kResidentStages embedding stages fit a block's shared
// memory, e.g. d = 768 with 32 padded columns on sm_90, in bf16, fp16 and fp32): the map is copied
// into shared memory once per block and only the embeddings stream, in steps of 64 columns through
// a pipeline that runs across the block's tiles (of 128 rows for 16-bit embeddings at maps of 16 or
// 32 columns, each warp taking two row fragments, else 64); the launcher starts as many blocks as
// the SMs hold, so the map is read once per few thousand rows instead of once per 64.
// Row kernel (wider maps): a warp per row, lanes over the map's columns.
//
// Written against Block and Mma types as lelp/warp_loss.h is against Warp: csrc/cuda/ supplies
// __syncthreads, cp.async and WMMA, tests/cuda_emu/ kThreads host threads (copies deferred until
// the wait that covers them, so a missing wait reads stale data) and plain products of whole tiles.
//   Block: thread() (0 .. kThreads - 1), sync(), Warp (a Warp type of width 32) and warp() (this
//          thread's); copy16(void* shared, const void* global) (16 bytes, asynchronous),
//          commit() (closes this thread's group of copies), wait<N>() (all but the N newest
//          groups have landed; a sync() after it makes them visible to the block)
//   Mma:   Raw (the embeddings' element, as read and staged: 16-bit words or float), Stage (the
//          map's and the products' 16-bit element), kK (the MMA's k), kVec (Raw elements per 16
//          bytes), kSplitX (fp32 embeddings: split8(const Raw*, Stage* hi, Stage* lo) splits 8
//          values, every pointer 16-byte aligned); fragment types A, B, Acc; fill(acc, v);
//          load_a(frag, const Stage*, ld); BAt b_at(const Stage*, ld) (a B fragment's address as
//          the loads take it, made once a step) and load_b(frag, BAt, offset, ld) (offset elements on);
//          mma(acc, a, b) (acc += a b); store(warp, float*, acc, ld)
#pragma once

#include <cstring>
#include <type_traits>

#include "cpu/targets.h"
#include "lelp/warp_loss.h"

namespace lelp {
namespace tile {

constexpr int kThreads = 256;       // 8 warps: 4 row groups x 2 column sets
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 64;           // rows per block: 16 per row group
constexpr int kStepK = 32;          // embedding columns (map rows) staged per step
constexpr int kMaxTileCols = 256;   // widest padded map (J) the tile takes; wider maps use the row kernel
constexpr int kMaxFrags = kMaxTileCols / 16 / 2;  // accumulator fragments per warp
constexpr int kLdX = kStepK + 8;    // shared-memory leading dimension of the embeddings (elements),
                                    // padded against bank conflicts and a multiple of 8 so that
                                    // every fragment pointer is 32-byte aligned as WMMA requires

LELP_HD int pad16(int64_t j) { return static_cast<int>((j + 15) / 16 * 16); }

// The caller's split map: split_rows(d) x split_cols(J) per part, zero-padded (no bounds in the copy).
LELP_HD int64_t split_rows(int64_t d) { return (d + kStepK - 1) / kStepK * kStepK; }
LELP_HD int split_cols(int64_t J) { return pad16(J); }

// Leading dimension of the map's stage (the padded map plus 8, as kLdX).
LELP_HD int ld_w(const TargetsArgs& a) { return split_cols(a.J) + 8; }

// Floats per row of the projections buffer: the padded map and the class logits after the K projections.
LELP_HD int ld_u(const TargetsArgs& a) {
  const int64_t need = pad16(a.J) > a.C * a.S + a.C ? pad16(a.J) : a.C * a.S + a.C;
  return static_cast<int>((need + 7) / 8 * 8);
}

constexpr int kMapBytes = 2;  // a map entry's part (Mma::Stage: bf16 or fp16)

// The streaming tile's accumulator fragments a warp holds: kPairedFrags for each of its two row
// fragments (128-row tiles) at embeddings in 16-byte rows and maps of up to kPairedMaxCols padded
// columns, else kMaxFrags for its one (64-row tiles). Two row fragments load each map fragment once
// for 32 rows, and a step's map serves 128 rows: at K = 128 with the head (144 columns) the map's
// stream is half of the 64-row tile's. Their 80 accumulator registers leave room for two blocks an
// SM (128 registers a thread; fp32's split embeddings, a second A fragment a row fragment, too since
// its fragments load by ldmatrix); 8 fragments of a wider map, or rows copied element by element
// (132 registers in bf16 on sm_90), do not. A map of fewer columns takes the instantiation of its
// own count, paired_frags: without a run-time guard a fragment (step_products), each warp computes
// all its kFrags, one past the map's width at most.
constexpr int kPairedFrags = 5;
constexpr int kPairedMaxCols = 2 * 16 * kPairedFrags;
// The fragments a warp of the 128-row tile takes a row fragment: half the map's 16-column fragments,
// rounded up (1 to kPairedFrags).
LELP_HD int paired_frags(const TargetsArgs& a) { return (split_cols(a.J) / 16 + 1) / 2; }

// The 128-row tile's map stage has a leading dimension fixed by its instantiation (frags fragments a
// warp: the 32 frags columns its warps compute, plus 8): the step's B fragments and map copies then sit
// at constant offsets (immediates of their loads and copies), where a run-time ld_w cost an address
// computation each (about 5 % of the tile's instructions at K = 128). 40, 72, 104, 136 and 168
// elements (20 + 16 i words) a row keep ldmatrix's 8 rows on distinct banks. One width for every
// instantiation (168) made small maps' blocks 63 KB: on 100 KB SMs (sm_86/89) two no longer fit.
LELP_HD constexpr int paired_ld_w(int frags) { return 32 * frags + 8; }

// The leading dimension of the streaming tile's map stage at tile_rows rows a tile.
LELP_HD int stage_ld_w(const TargetsArgs& a, int64_t tile_rows) {
  return tile_rows == 2 * kRows ? paired_ld_w(paired_frags(a)) : ld_w(a);
}

// Shared memory an SM has for blocks (sm_90's 228 KB; sm_80's 164 KB, sm_86/89's 100 KB), and what
// the driver keeps of it for each block.
constexpr int64_t kSm90SmemPerSm = 233472;
constexpr int64_t kSmemReservedPerBlock = 1024;

// Bytes of one stage of a tile of tile_rows: the embeddings (emb_bytes an element: 2 for
// bf16/fp16, 4 for fp32), then the map's hi and lo parts; every part is a multiple of 32 bytes.
LELP_HD int64_t stage_bytes_at(int64_t tile_rows, int emb_bytes, int ldw) {
  return tile_rows * kLdX * emb_bytes + 2 * kMapBytes * int64_t{kStepK} * ldw;
}

LELP_HD int64_t stage_bytes(const TargetsArgs& a, int emb_bytes, int64_t tile_rows) {
  return stage_bytes_at(tile_rows, emb_bytes, stage_ld_w(a, tile_rows));
}

// Bytes of the hi and lo parts fp32 embeddings (emb_bytes 4) are split into, a step of rows x ld; 0 otherwise.
LELP_HD int64_t split_bytes(int64_t rows, int ld, int emb_bytes) {
  return emb_bytes == 4 ? 2 * kMapBytes * rows * ld : 0;
}

// Shared-memory bytes of the streaming tile, whose warps take row_frags row fragments: two stages
// (and fp32's split step), or the projections (fp32) and each row's class log-sum-exp that take
// their place after the last step, whichever is larger.
LELP_HD int64_t smem_bytes(const TargetsArgs& a, int emb_bytes, int row_frags) {
  const int64_t rows = int64_t{kRows} * row_frags;
  const int64_t stages = 2 * stage_bytes(a, emb_bytes, rows) + split_bytes(rows, kLdX, emb_bytes);
  const int64_t u = 4 * rows * (ld_u(a) + 1);
  return stages > u ? stages : u;
}

// Row fragments a warp of the streaming tile takes (its tiles are 64 x that rows): 2 where the
// rows and map allow it (kPairedFrags above; vec: tile_vector_loads) and two blocks of the
// 128-row tile still fit the SM's smem_per_sm bytes of shared memory (its projections grow with
// ld_u: with given logits K + C may pass the map's width), else 1.
LELP_HD int streaming_row_frags(const TargetsArgs& a, int emb_bytes, bool vec, int64_t smem_per_sm) {
  const bool fits = 2 * (smem_bytes(a, emb_bytes, 2) + kSmemReservedPerBlock) <= smem_per_sm;
  return vec && split_cols(a.J) <= kPairedMaxCols && fits ? 2 : 1;
}

// The resident form (targets_tiles_resident): steps of 64 embedding columns (the per-step
// barrier, wait and copy bookkeeping over twice the products of a streaming step), 4 of them in
// flight across tiles.
constexpr int kResidentStepK = 64;
constexpr int kLdXResident = kResidentStepK + 8;  // as kLdX
constexpr int kResidentStages = 4;

// The map width (padded columns) the resident form is compiled for: 16 or 32 (K = 16 with given
// logits or the head), so that its fragment addresses and accumulators are constants; 0: any
// width, read at run time.
LELP_HD int resident_cols(const TargetsArgs& a) {
  const int cols = split_cols(a.J);
  return cols == 16 || cols == 32 ? cols : 0;
}

// The padded map width: kCols, or split_cols(J) when kCols is 0.
template <int kCols>
LELP_HD int tile_cols(const TargetsArgs& a) {
  return kCols > 0 ? kCols : split_cols(a.J);
}

// Accumulator fragments a warp holds at kCols (warps take every other 16 columns): 1 at 16 or 32.
template <int kCols>
constexpr int kFragsPerWarp = kCols > 0 ? (kCols / 16 + 1) / 2 : kMaxFrags;

// Row fragments a warp of the resident form takes: 2 (128-row tiles, each map fragment loaded once
// for two row fragments, and a step's fixed work over twice the rows) for 16-bit inputs at 16 or
// 32 columns; else 1 (64-row tiles: the accumulators of a wide map, or fp32's stages, leave no room).
LELP_HD int resident_row_frags(const TargetsArgs& a, int emb_bytes) {
  return resident_cols(a) > 0 && emb_bytes == 2 ? 2 : 1;
}

// Map rows held by the resident form: whole steps (the rows past split_rows(d) are zeros).
LELP_HD int64_t resident_map_rows(int64_t d) { return (d + kResidentStepK - 1) / kResidentStepK * kResidentStepK; }

// Shared-memory bytes of the resident form: the split map (hi and lo, resident_map_rows(d) x ld_w
// each), kResidentStages embedding stages of a tile's rows (and fp32's split step), then the tile's
// projections and each row's class log-sum-exp.
LELP_HD int64_t resident_smem_bytes(const TargetsArgs& a, int emb_bytes) {
  const int64_t rows = int64_t{kRows} * resident_row_frags(a, emb_bytes);
  const int64_t map = 2 * kMapBytes * resident_map_rows(a.d) * ld_w(a);
  const int64_t stages = int64_t{kResidentStages} * rows * kLdXResident * emb_bytes;
  return map + stages + split_bytes(rows, kLdXResident, emb_bytes) + 4 * rows * (ld_u(a) + 1);
}

// Whether the tile takes this call in the resident form: the map and stages fit a block's
// shared memory (optin_bytes: the device's opt-in limit, 232,448 B on sm_90, 166,912 on sm_80).
LELP_HD bool resident_takes(const TargetsArgs& a, int emb_bytes, int64_t optin_bytes) {
  return a.d > 0 && resident_smem_bytes(a, emb_bytes) <= optin_bytes;
}

// Calls f(std::integral_constant<int, resident_cols(a)>{}): the one place that maps a call to a
// resident-form instantiation (the CUDA launch and the tests' host run).
template <class F>
void with_resident_cols(const TargetsArgs& a, F&& f) {
  switch (resident_cols(a)) {
    case 16: return f(std::integral_constant<int, 16>{});
    case 32: return f(std::integral_constant<int, 32>{});
    default: return f(std::integral_constant<int, 0>{});
  }
}

// Calls f(std::integral_constant<int, row fragments>{}, std::integral_constant<int, fragments>{}):
// the one place that maps row_frags (streaming_row_frags) of a call to a streaming-tile instantiation
// (rows copied by element, kVec false, have one; the 128-row tile one a paired_frags).
template <bool kVec, class F>
void with_streaming_layout(const TargetsArgs& a, int row_frags, F&& f) {
  using std::integral_constant;
  if constexpr (kVec)
    if (row_frags == 2) switch (paired_frags(a)) {
        case 1: return f(integral_constant<int, 2>{}, integral_constant<int, 1>{});
        case 2: return f(integral_constant<int, 2>{}, integral_constant<int, 2>{});
        case 3: return f(integral_constant<int, 2>{}, integral_constant<int, 3>{});
        case 4: return f(integral_constant<int, 2>{}, integral_constant<int, 4>{});
        default: return f(integral_constant<int, 2>{}, integral_constant<int, kPairedFrags>{});
      }
  return f(integral_constant<int, 1>{}, integral_constant<int, kMaxFrags>{});
}

// Whether the tensor-core tile takes this call.
inline bool tile_takes(const TargetsArgs& a) {
  return pad16(a.J) <= kMaxTileCols && a.C * a.S + a.C <= kMaxTileCols;
}

// Whether every embedding row starts 16-byte aligned, so that the stage can copy 16 bytes at a time.
inline bool tile_vector_loads(const TargetsArgs& a) {
  const int64_t elem = a.emb_dtype == kFloat32 ? 4 : 2;
  return reinterpret_cast<uintptr_t>(a.embeddings) % 16 == 0 && (a.emb_stride * elem) % 16 == 0 &&
         (a.d * elem) % 16 == 0;
}

// 16 zero bytes at p (16-byte aligned): one 16-byte store on the GPU.
template <class T>
LELP_HD void zero16(T* p) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint4*>(p) = make_uint4(0, 0, 0, 0);
#else
  std::memset(p, 0, 16);
#endif
}

// Issues the copies of the embeddings' columns k0 .. k0 + kStep - 1 into x (kTileRows rows, leading
// dimension kLd; zeros outside). kVec (tile_vector_loads): a chunk of V is one 16-byte copy or 16
// zero bytes; a thread's chunks lie kRowsApart rows apart in one column, so one source and one
// destination are worked out a step and the rest sit at constant offsets from them (a division, a
// row check and a 64-bit product a chunk before, in a loop). Otherwise element by element.
template <class Block, class Mma, bool kVec, int kStep = kStepK, int kLd = kLdX, int kTileRows = kRows>
LELP_DEV void stage_embeddings(const Block& b, const TargetsArgs& a, int64_t row0, int64_t k0,
                               typename Mma::Raw* x) {
  using Raw = typename Mma::Raw;
  constexpr int V = Mma::kVec, kChunksPerRow = kStep / V;
  const Raw* emb = static_cast<const Raw*>(a.embeddings);  // raw words of the embeddings' type
  if constexpr (kVec) {
    static_assert(kThreads % kChunksPerRow == 0 && kTileRows * kChunksPerRow % kThreads == 0, "whole rows of chunks");
    constexpr int kRowsApart = kThreads / kChunksPerRow, Q = kTileRows * kChunksPerRow / kThreads;
    const int r = b.thread() / kChunksPerRow, k = b.thread() % kChunksPerRow * V;
    const bool in_columns = k0 + k < a.d;  // d is a multiple of V
    const int64_t rows_left = a.n - (row0 + r);
    const Raw* src = emb + (row0 + r) * a.emb_stride + k0 + k;
    Raw* at = x + r * kLd + k;
#pragma unroll
    for (int q = 0; q < Q; ++q) {
      Raw* to = at + q * kRowsApart * kLd;
      if (in_columns && q * kRowsApart < rows_left) b.copy16(to, src + q * kRowsApart * a.emb_stride);
      else zero16(to);
    }
  } else {
#pragma unroll 1  // a few chunks a thread (tests/cuda_targets_cost.py counts a loop's body once per trip)
    for (int i = b.thread(); i < kTileRows * kStep / V; i += kThreads) {
      const int r = i / kChunksPerRow, k = i % kChunksPerRow * V;
      const int64_t row = row0 + r, col = k0 + k;
      Raw* at = x + r * kLd + k;
      for (int e = 0; e < V; ++e) at[e] = row < a.n && col + e < a.d ? emb[row * a.emb_stride + col + e] : Raw{0};
    }
  }
}

// A thread's 16-byte chunks of the map's rows (chunks = split_cols(J) / 8 a row, row-major): chunk
// thread + q kThreads at (row k, chunk c), walked without a division a chunk (the resident form's
// copy of the whole map: every lane busy at any width).
struct MapChunks {
  int k, c, dk;
  LELP_HD MapChunks(int thread, int chunks) : k(thread / chunks), c(thread % chunks), dk(kThreads / chunks) {}
  LELP_HD void next(int chunks) {
    k += dk;
    c += kThreads - dk * chunks;
    if (c >= chunks) c -= chunks, ++k;
  }
};

// Issues the copies of map rows k0 .. k0 + rows - 1 (every column, hi and lo) into wh / wl (leading
// dimension ld_w): the resident form's, once a block.
template <class Block, class Mma>
LELP_DEV void stage_map(const Block& b, const TargetsArgs& a, int64_t k0, int rows, typename Mma::Stage* wh,
                        typename Mma::Stage* wl) {
  using Stage = typename Mma::Stage;
  static_assert(sizeof(Stage) == 2, "8 map entries a 16-byte chunk (MapChunks)");
  const int cols = split_cols(a.J), ldw = ld_w(a), chunks = cols / 8;
  if (chunks == 0) return;  // no map (J = 0): MapChunks would divide by 0
  const Stage* hi = static_cast<const Stage*>(a.w_hi) + k0 * cols;
  const Stage* lo = static_cast<const Stage*>(a.w_lo) + k0 * cols;
#pragma unroll 1
  for (MapChunks m(b.thread(), chunks); m.k < rows; m.next(chunks)) {
    const int dst = m.k * ldw + m.c * 8, src = m.k * cols + m.c * 8;
    b.copy16(wh + dst, hi + src);
    b.copy16(wl + dst, lo + src);
  }
}

// Issues the copies of a streaming step's kStepK map rows from k0 (every column, hi and lo) into wh /
// wl (leading dimension ld_w): warp w takes rows w, w + kWarps, ..., lane c the row's 16-byte chunk c
// (a row has at most kMaxTileCols / 8 = 32). No division (MapChunks took two a step); lanes past
// the row's chunks idle. kUnroll: the rows unrolled (kStepK / kWarps: in the 128-row tile) or one
// at a time (1: the 64-row tile, whose 8 fp16 accumulators left the unrolled addresses no room:
// 128 registers on sm_80). kLdW: the stage's leading dimension (0: ld_w(a), at run time).
template <class Block, class Mma, int kUnroll, int kLdW = 0>
LELP_DEV void stage_map_step(const Block& b, const TargetsArgs& a, int64_t k0, typename Mma::Stage* wh,
                             typename Mma::Stage* wl) {
  using Stage = typename Mma::Stage;
  static_assert(sizeof(Stage) == 2 && kMaxTileCols / 8 <= 32, "a row's 16-byte chunks across a warp's lanes");
  static_assert(kStepK % kWarps == 0, "whole rows a warp");
  const int cols = split_cols(a.J), ldw = kLdW > 0 ? kLdW : ld_w(a), lane = b.thread() % 32, warp = b.thread() / 32;
  if (lane >= cols / 8) return;
  // the lane's chunk of the warp's first row, and the others at 32-bit offsets from it (a pointer a
  // row kept live took registers the accumulators need)
  const int64_t src = (k0 + warp) * cols + lane * 8;
  const Stage* hi = static_cast<const Stage*>(a.w_hi) + src;
  const Stage* lo = static_cast<const Stage*>(a.w_lo) + src;
  const int dst = warp * ldw + lane * 8;
#pragma unroll kUnroll
  for (int q = 0; q < kStepK / kWarps; ++q) {
    b.copy16(wh + dst + q * kWarps * ldw, hi + q * kWarps * cols);
    b.copy16(wl + dst + q * kWarps * ldw, lo + q * kWarps * cols);
  }
}

// The map's hi part in a stage of the streaming tile of kTileRows (after the embeddings); its lo part follows.
template <class Mma, int kTileRows>
LELP_DEV typename Mma::Stage* stage_map_hi(char* stage) {
  return reinterpret_cast<typename Mma::Stage*>(stage + kTileRows * kLdX * sizeof(typename Mma::Raw));
}

// Issues the copies of step k0 into stage x (the tile's embeddings, then the map's 32 rows hi and lo,
// leading dimension kLdW, or ld_w(a) where it is 0) and commits them as this thread's group.
template <class Block, class Mma, bool kVec, int kTileRows, int kLdW>
LELP_DEV void stage_step(const Block& b, const TargetsArgs& a, int64_t row0, int64_t k0, char* stage) {
  typename Mma::Stage* wh = stage_map_hi<Mma, kTileRows>(stage);
  stage_embeddings<Block, Mma, kVec, kStepK, kLdX, kTileRows>(b, a, row0, k0,
                                                              reinterpret_cast<typename Mma::Raw*>(stage));
  const int ldw = kLdW > 0 ? kLdW : ld_w(a);
  stage_map_step<Block, Mma, kTileRows == 2 * kRows ? kStepK / kWarps : 1, kLdW>(b, a, k0, wh, wh + kStepK * ldw);
  b.commit();
}

// fp32 embeddings (Mma::kSplitX): a landed step x (kTileRows x kStep, leading dimension kLd) into
// its 16-bit hi and lo parts (the same layout), 8 values a thread at a time, so that the products
// load 16-bit fragments.
template <class Block, class Mma, int kStep, int kLd, int kTileRows>
LELP_DEV void split_step(const Block& b, const typename Mma::Raw* x, typename Mma::Stage* hi,
                         typename Mma::Stage* lo) {
  constexpr int kChunks = kTileRows * kStep / 8, Q = kChunks / kThreads;
  static_assert(kChunks % kThreads == 0, "whole chunks a thread");
#pragma unroll
  for (int q = 0; q < Q; ++q) {
    const int i = b.thread() + q * kThreads, r = i / (kStep / 8), k = i % (kStep / 8) * 8;
    Mma::split8(x + r * kLd + k, hi + r * kLd + k, lo + r * kLd + k);
  }
}

// A step's products into the warp's accumulators: xh the staged embeddings (leading dimension kLd;
// fp32's hi part, xl its lo part), wh / wl the step's kStep map rows (leading dimension kLdW, or ld_w);
// fragment i is map columns 16 (set + 2 i) .. + 15 (those below the padded map's width are live).
// kUnroll: the k slices unrolled (1: one after another); kCols: the padded map width as a constant
// (0: at run time); kRowFrags row fragments a warp, each with kFrags accumulators (at most); kLdW:
// wh's and wl's leading dimension (0: the padded map width plus 8, at run time where kCols is 0).
template <class Mma, int kStep = kStepK, int kLd = kLdX, int kUnroll = 1, int kCols = 0, int kRowFrags = 1,
          int kFrags = kFragsPerWarp<kCols>, int kLdW = 0>
LELP_DEV void step_products(const TargetsArgs& a, int warp, const typename Mma::Stage* xh,
                            const typename Mma::Stage* xl, const typename Mma::Stage* wh,
                            const typename Mma::Stage* wl, typename Mma::Acc* acc) {
  // (warp / 4) & 1 is warp / 4 for the block's 8 warps, and lets the compiler drop the fragment
  // guards that always hold (set + 2 i < frags)
  static_assert(kWarps == 8, "4 row groups x 2 column sets");
  const int cols = tile_cols<kCols>(a), ldw = kLdW > 0 ? kLdW : cols + 8, frags = cols / 16, set = (warp / 4) & 1;
  if (kFrags == 1 && set >= frags) return;  // a 16-column map: the second column set has no fragment
  // the B fragments' addresses, once a step: fragment i of k slice kk at constant offsets from them
  const typename Mma::BAt bh_at = Mma::b_at(wh + set * 16, ldw), bl_at = Mma::b_at(wl + set * 16, ldw);
  // The k slices: one after another in the streaming tile (up to 8 fragments a warp, or 2 x 5, at
  // 128 registers); unrolled in the resident form (one block per SM, the whole register file).
#pragma unroll kUnroll
  for (int kk = 0; kk < kStep; kk += Mma::kK) {
    typename Mma::A ah[kRowFrags], al[kRowFrags];
#pragma unroll
    for (int r = 0; r < kRowFrags; ++r) {
      // (pointer + row) + kk: kk stays a constant offset of the load (pointer + (row + kk) costs an
      // address computation a slice)
      const int row = ((warp & 3) * kRowFrags + r) * 16 * kLd;
      Mma::load_a(ah[r], xh + row + kk, kLd);
      if constexpr (Mma::kSplitX) Mma::load_a(al[r], xl + row + kk, kLd);
    }
#pragma unroll
    for (int i = 0; i < kFrags; ++i) {
      // The 128-row tile (a constant leading dimension, paired_ld_w(kFrags), with room for 2 kFrags
      // fragments; kFrags = paired_frags) computes a fragment past the map's width too (one at
      // most), from whatever the stage holds past the copied columns: column j of a product reads
      // column j of B alone, and those accumulators are never stored (store_projections). A
      // run-time guard cost the k slice a warp-synchronous branch a fragment (4 of the 10
      // instructions besides its loads and MMAs).
      const int f = set + 2 * i;
      if (kLdW == 0 && f >= frags) continue;
      // the hi part's products before the lo part is loaded: one B fragment live at a time where
      // two row fragments share it (each accumulator still adds hi, lo, then fp32's lo * hi)
      typename Mma::B bh, bl;
      Mma::load_b(bh, bh_at, kk * ldw + 32 * i, ldw);
#pragma unroll
      for (int r = 0; r < kRowFrags; ++r) Mma::mma(acc[r * kFrags + i], ah[r], bh);
      Mma::load_b(bl, bl_at, kk * ldw + 32 * i, ldw);
#pragma unroll
      for (int r = 0; r < kRowFrags; ++r) {
        Mma::mma(acc[r * kFrags + i], ah[r], bl);
        // x_lo * w_lo (about 2^-16 of the term) is left out
        if constexpr (Mma::kSplitX) Mma::mma(acc[r * kFrags + i], al[r], bh);
      }
    }
  }
}

// The warp's accumulators into u (the tile's rows x ld_u floats): the tile's projections without the
// bias, columns [0, pad16(J)); warp w's row fragments are (w % 4) kRowFrags + r.
template <class Block, class Mma, int kCols = 0, int kRowFrags = 1, int kFrags = kFragsPerWarp<kCols>>
LELP_DEV void store_projections(const Block& b, const TargetsArgs& a, typename Mma::Acc* acc, float* u) {
  const int warp = b.thread() / 32, frags = tile_cols<kCols>(a) / 16, set = (warp / 4) & 1, ldu = ld_u(a);
#pragma unroll
  for (int r = 0; r < kRowFrags; ++r) {
    // one address a row fragment, its fragments at constant offsets from it (an address a fragment,
    // kept across the tile loop, spilled at 2 x 5 fragments in bf16)
    float* row = u + ((warp & 3) * kRowFrags + r) * 16 * ldu + set * 16;
#pragma unroll
    for (int i = 0; i < kFrags; ++i)
      if (set + 2 * i < frags) Mma::store(b.warp(), row + 32 * i, acc[r * kFrags + i], ldu);
  }
}

// u (the tile's 64 kRowFrags rows x ld_u floats, over the stages) = the tile's projections without the
// bias, columns [0, pad16(J)); kFrags: accumulators a row fragment (with_streaming_layout). The
// embeddings stream once: step s + 1's copies are in flight while step s multiplies.
template <class Block, class Mma, bool kVec, int kRowFrags, int kFrags>
LELP_DEV void tile_projections(const Block& b, const TargetsArgs& a, int64_t row0, char* stages, float* u) {
  using Stage = typename Mma::Stage;
  using Raw = typename Mma::Raw;
  constexpr int kTileRows = kRows * kRowFrags;
  const int warp = b.thread() / 32;
  // the map stage's leading dimension: the 128-row tile's fixed by its fragments (stage_ld_w)
  constexpr int kLdW = kRowFrags == 2 ? paired_ld_w(kFrags) : 0;
  const int ldw = kLdW > 0 ? kLdW : ld_w(a);
  const int bytes = static_cast<int>(stage_bytes_at(kTileRows, sizeof(Raw), ldw));  // a stage of shared memory
  const int steps = static_cast<int>((a.d + kStepK - 1) / kStepK);
  Stage* split_hi = reinterpret_cast<Stage*>(stages + 2 * bytes);  // fp32 embeddings' parts of a step
  Stage* split_lo = split_hi + kTileRows * kLdX;
  typename Mma::Acc acc[kRowFrags * kFrags];
#pragma unroll
  for (int i = 0; i < kRowFrags * kFrags; ++i) Mma::fill(acc[i], 0.f);
  if (steps > 0) stage_step<Block, Mma, kVec, kTileRows, kLdW>(b, a, row0, 0, stages);
  for (int s = 0; s < steps; ++s) {  // block-uniform
    char* x = stages + (s & 1) * bytes;
    if (s + 1 < steps) {
      stage_step<Block, Mma, kVec, kTileRows, kLdW>(b, a, row0, (s + 1) * kStepK, stages + ((s + 1) & 1) * bytes);
      b.template wait<1>();  // step s has landed; s + 1 stays in flight
    } else {
      b.template wait<0>();
    }
    b.sync();
    const Stage *wh = stage_map_hi<Mma, kTileRows>(x), *xh = reinterpret_cast<const Stage*>(x), *xl = nullptr;
    if constexpr (Mma::kSplitX) {
      split_step<Block, Mma, kStepK, kLdX, kTileRows>(b, reinterpret_cast<const Raw*>(x), split_hi, split_lo);
      b.sync();
      xh = split_hi, xl = split_lo;
    }
    step_products<Mma, kStepK, kLdX, 1, 0, kRowFrags, kFrags, kLdW>(a, warp, xh, xl, wh, wh + kStepK * ldw, acc);
    b.sync();  // the next step's copies overwrite this stage, its split parts the split (and u overwrites all)
  }
  store_projections<Block, Mma, 0, kRowFrags, kFrags>(b, a, acc, u);
  b.sync();
}

// The (row, column) pairs of rows of n columns that a lane takes, lane-strided (lane, lane + 32, ...
// in row-major order), without a division a pair.
struct LanePairs {
  int r, c, dr, dc, n;
  LELP_DEV LanePairs(int lane, int columns) : r(lane / columns), c(lane % columns), dr(32 / columns),
                                              dc(32 % columns), n(columns) {}
  LELP_DEV void next() { step(); }
  // next(), saying whether the column wrapped to the next row
  LELP_DEV bool step() {
    r += dr;
    c += dc;
    if (c < n) return false;
    c -= n, ++r;
    return true;
  }
};

// Bias, class logits and log-softmaxes of the warp's kTileRows / 8 rows of u; stores them. Every
// step takes the lanes over the warp's rows as a whole (one row at a time used C of 32 lanes, and
// two butterflies a row): the bias over (column, row), the given logits over (row, class) pairs,
// each row's class log-sum-exp on a lane of its own, the subclass log-softmaxes over (row, class)
// pairs, the stores over (row, element) pairs. lse: the block's kTileRows floats.
template <class Block, int kTileRows = kRows>
LELP_DEV void tile_epilogue(const Block& b, const TargetsArgs& a, int64_t row0, float* u, float* lse) {
  using Warp = typename Block::Warp;
  constexpr int R = kTileRows / kWarps;
  static_assert(R <= 32, "a lane per row for the class log-sum-exps");
  const Warp w = b.warp();
  const int warp = b.thread() / 32, lane = w.lane(), ldu = ld_u(a), r0 = warp * R;
  const int C = static_cast<int>(a.C), S = static_cast<int>(a.S), K = C * S, J = static_cast<int>(a.J);
  float* uw = u + r0 * ldu;  // the warp's rows
  // Lane-strided loops: not unrolled (at the usual K <= 32 they take one trip or none).
#pragma unroll 1
  for (int j = lane; j < J; j += 32) {
    const float bias = a.bias[j];
#pragma unroll
    for (int r = 0; r < R; ++r) uw[r * ldu + j] += bias;
  }
  if (a.logits != nullptr)
#pragma unroll 1
    for (LanePairs p(lane, C); p.r < R; p.next()) {  // (row, class) pairs
      const int64_t row = row0 + r0 + p.r;
      uw[p.r * ldu + K + p.c] = row < a.n ? Warp::load(a.logits, a.logits_dtype, row * a.logits_stride + p.c) : 0.f;
    }
  w.sync();
  if (lane < R) lse[r0 + lane] = shift_class_logits(uw + lane * ldu + K, C, 1, a.inv_tau);  // the logits shifted
  w.sync();
#pragma unroll 1
  for (LanePairs p(lane, C); p.r < R; p.next()) {  // lelp::row_log_targets' order of operations
    float* uc = uw + p.r * ldu + p.c * S;
    subclass_log_softmax(uc, S, a.inv_beta, uw[p.r * ldu + K + p.c] - lse[r0 + p.r], uc);
  }
  w.sync();
  // (row, element) pairs, a row of K < 32 leaving no lane idle; row-major, so the rows past n end the walk
  const int64_t rows_left = a.n - (row0 + r0);
  const int rows = rows_left < R ? static_cast<int>(rows_left) : R;
  LanePairs p(lane, K);
  // the pair's output element and u's float, moved with the walk (no 64-bit product a pair)
  int64_t at = (row0 + r0 + p.r) * a.out_stride + p.c;
  int from = p.r * ldu + p.c;
  const int64_t at_step = p.dr * a.out_stride + p.dc, at_wrap = a.out_stride - K;
  const int from_step = p.dr * ldu + p.dc, from_wrap = ldu - K;
#pragma unroll 1
  while (p.r < rows) {
    Warp::store(a.out, a.out_dtype, at, uw[from]);
    at += at_step, from += from_step;
    if (p.step()) at += at_wrap, from += from_wrap;
  }
}

// The streaming tile's body: the block's tiles of 64 kRowFrags rows, grid-stride. smem: smem_bytes(a,
// sizeof(Raw), kRowFrags), 128-byte aligned; kVec: tile_vector_loads(a); kRowFrags, kFrags:
// with_streaming_layout.
template <class Block, class Mma, bool kVec, int kRowFrags, int kFrags>
LELP_DEV void targets_tiles(const Block& b, const TargetsArgs& a, char* smem, int64_t block, int64_t n_blocks) {
  constexpr int kTileRows = kRows * kRowFrags;
  float* u = reinterpret_cast<float*>(smem);  // written once the last step's products are done
  float* lse = u + kTileRows * ld_u(a);
  for (int64_t row0 = block * kTileRows; row0 < a.n; row0 += n_blocks * kTileRows) {  // block-uniform
    tile_projections<Block, Mma, kVec, kRowFrags, kFrags>(b, a, row0, smem, u);
    tile_epilogue<Block, kTileRows>(b, a, row0, u, lse);
    b.sync();  // the next tile's copies overwrite u
  }
}

// The resident form's body: the whole split map in shared memory, copied once per block (before
// its first tile), and only the embeddings streaming, through kResidentStages stages that run on
// across the block's tiles (the next tile's first steps are in flight during this tile's
// epilogue). A block should be persistent (a grid of the SMs' resident blocks): 4 M rows read a
// d = 768 map of 32 columns once per 30,000 rows instead of once per 64. Steps of kResidentStepK
// columns, tiles of 64 kRowFrags rows. smem: resident_smem_bytes(a, sizeof(Raw)), 128-byte
// aligned; needs a.d > 0; kVec: tile_vector_loads(a); kCols: resident_cols(a) (a small map's kernel
// has constant fragment addresses and none of a wide map's fragments, not even as skipped branches).
template <class Block, class Mma, bool kVec, int kCols>
LELP_DEV void targets_tiles_resident(const Block& b, const TargetsArgs& a, char* smem, int64_t block,
                                     int64_t n_blocks) {
  using Stage = typename Mma::Stage;
  using Raw = typename Mma::Raw;
  constexpr int P = kResidentStages, kStep = kResidentStepK, kLd = kLdXResident, kFrags = kFragsPerWarp<kCols>;
  constexpr int kRowFrags = kCols > 0 && sizeof(Raw) == 2 ? 2 : 1;  // resident_row_frags
  constexpr int kTileRows = kRows * kRowFrags;
  const int cols = tile_cols<kCols>(a), ldw = cols + 8;
  const int64_t map_rows = resident_map_rows(a.d), map_elems = map_rows * ldw, stage = int64_t{kTileRows} * kLd;
  Stage* map_hi = reinterpret_cast<Stage*>(smem);
  Stage* map_lo = map_hi + map_elems;
  Raw* stages = reinterpret_cast<Raw*>(map_lo + map_elems);
  Stage* split_hi = reinterpret_cast<Stage*>(stages + P * stage);  // fp32 embeddings' parts of a step
  Stage* split_lo = split_hi + stage;
  float* u = reinterpret_cast<float*>(reinterpret_cast<char*>(split_hi) + split_bytes(kTileRows, kLd, sizeof(Raw)));
  float* lse = u + kTileRows * ld_u(a);
  const int64_t steps = map_rows / kStep, tiles = (a.n + kTileRows - 1) / kTileRows;
  const int64_t mine = block < tiles ? (tiles - block + n_blocks - 1) / n_blocks : 0;  // this block's tiles
  // The copies run P - 1 steps ahead of the products, across tiles: (tile, step) = (it, is), into
  // stage slot. Every step commits a group, empty past the block's last step, so that wait<P - 2>
  // always means "the oldest step in flight has landed".
  int64_t it = 0, is = 0;
  int slot = 0;
  // With 16-byte rows, this thread's Q chunks of a step sit at the same (row, column) offsets in
  // every step: their rows and sources (read only below a.n) move kStep columns a step, and on to
  // the block's next tile after each tile's last step.
  constexpr int V = Mma::kVec, Q = kTileRows * kStep / V / kThreads;
  const int64_t rows_apart = int64_t{n_blocks} * kTileRows;
  int64_t row[Q];
  const Raw* src[Q];
#pragma unroll
  for (int q = 0; q < Q; ++q) {
    const int i = b.thread() + q * kThreads;
    row[q] = block * kTileRows + i / (kStep / V);
    src[q] = static_cast<const Raw*>(a.embeddings) + row[q] * a.emb_stride + i % (kStep / V) * V;
  }
  auto issue = [&]() {
    if (it < mine) {
      if constexpr (kVec) {
#pragma unroll
        for (int q = 0; q < Q; ++q) {
          const int i = b.thread() + q * kThreads, r = i / (kStep / V), k = i % (kStep / V) * V;
          Raw* at = stages + slot * stage + r * kLd + k;
          if (row[q] < a.n && is * kStep + k < a.d) b.copy16(at, src[q] + is * kStep);
          else
            for (int e = 0; e < V; ++e) at[e] = Raw{0};
          if (is == steps - 1) row[q] += rows_apart, src[q] += rows_apart * a.emb_stride;
        }
      } else {
        stage_embeddings<Block, Mma, kVec, kStep, kLd, kTileRows>(b, a, (block + it * n_blocks) * kTileRows,
                                                                  is * kStep, stages + slot * stage);
      }
    }
    b.commit();
    slot = slot + 1 == P ? 0 : slot + 1;
    if (++is == steps) is = 0, ++it;
  };
  const int64_t split = split_rows(a.d);
  stage_map<Block, Mma>(b, a, 0, static_cast<int>(split), map_hi, map_lo);
  for (int64_t i = b.thread(); i < (map_rows - split) * cols; i += kThreads) {  // the last step's rows past the map
    const int64_t at = (split + i / cols) * ldw + i % cols;
    map_hi[at] = map_lo[at] = Stage{0};
  }
  b.commit();  // older than every step: the first step's wait covers it
  for (int i = 0; i < P - 1; ++i) issue();
  const int warp = b.thread() / 32;
  int ready = 0;  // the stage slot of the step being multiplied
  for (int64_t t = 0; t < mine; ++t) {  // block-uniform
    typename Mma::Acc acc[kRowFrags * kFrags];
#pragma unroll
    for (int i = 0; i < kRowFrags * kFrags; ++i) Mma::fill(acc[i], 0.f);
    for (int64_t s = 0; s < steps; ++s) {
      b.template wait<P - 2>();
      b.sync();  // this step is visible, and every warp is done with the previous step's stage, which this overwrites:
      issue();
      const Raw* x = stages + ready * stage;
      const Stage *xh = reinterpret_cast<const Stage*>(x), *xl = nullptr;
      if constexpr (Mma::kSplitX) {  // the previous step's products are done with the split (the barrier above)
        split_step<Block, Mma, kStep, kLd, kTileRows>(b, x, split_hi, split_lo);
        b.sync();
        xh = split_hi, xl = split_lo;
      }
      const int64_t k0 = s * kStep * ldw;
      step_products<Mma, kStep, kLd, kStep / Mma::kK, kCols, kRowFrags>(a, warp, xh, xl, map_hi + k0, map_lo + k0,
                                                                       acc);
      ready = ready + 1 == P ? 0 : ready + 1;
    }
    store_projections<Block, Mma, kCols, kRowFrags>(b, a, acc, u);
    b.sync();
    tile_epilogue<Block, kTileRows>(b, a, (block + t * n_blocks) * kTileRows, u, lse);
    // the next tile's projections land in u after its steps' barriers: every warp is done reading u
  }
  b.template wait<0>();  // no copy outlives the block (the groups past the last step are empty)
}

// The row kernel's body: a warp per row (grid-stride); u: the warp's K + C floats of shared memory.
template <class Warp>
LELP_DEV void targets_rows(const Warp& w, const TargetsArgs& a, float* u, int64_t warp_id, int64_t n_warps) {
  const int C = static_cast<int>(a.C), S = static_cast<int>(a.S);
  for (int64_t row = warp_id; row < a.n; row += n_warps) {  // warp-uniform
    warp::group_row_targets(w, a, row, C, S, u);
    for (int k = w.lane(); k < C * S; k += 32) Warp::store(a.out, a.out_dtype, row * a.out_stride + k, u[k]);
    w.sync();  // the next row overwrites u
  }
}

}  // namespace tile
}  // namespace lelp
