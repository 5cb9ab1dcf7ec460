// The CUDA kernels' bodies run on host threads: the same templates as csrc/cuda/*.cu, instantiated
// with HostWarp / HostBlock and plain fp32 tile products, launched over a few emulated warps or
// blocks (fewer than the rows, so that the grid-stride loops run); cp.async copies land at their
// wait. Used by emu_module.cpp (the tests' Python module) and race_check.cpp (the sanitizers).
#pragma once

#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

#include "host_warp.h"
#include "lelp/block_targets.h"
#include "lelp/warp_loss.h"

namespace lelp {
namespace emu {

constexpr int kEmulatedWarps = 3;  // fewer warps (and blocks) than rows: the grid-stride loops are exercised
constexpr int kEmulatedBlocks = 2;

template <int W, int CH, int V>
void loss_emulated(const LossArgs& a, const warp::OnlineTeachers& online) {
  const bool vec = warp::vector_loads_ok(a);
  for (int wid = 0; wid < kEmulatedWarps; ++wid) {
    WarpState state;
    std::vector<float> smem((32 / W) * warp::loss_row_scratch_floats(a, online.m > 0));
    run_warp([&](int lane) {
      warp::loss_rows<HostWarp<W>, CH, V>(HostWarp<W>{&state, lane}, a, online,
                                          smem.empty() ? nullptr : smem.data(), wid, kEmulatedWarps, vec);
    });
  }
}

inline void loss(const LossArgs& a) {
  const warp::OnlineTeachers online = warp::online_teachers(a);
  warp::with_loss_layout(a, [&](auto width, auto chunks, auto vec) {
    loss_emulated<decltype(width)::value, decltype(chunks)::value, decltype(vec)::value>(a, online);
  });
}

struct BlockState {
  std::barrier<> bar{tile::kThreads};
  WarpState warps[tile::kWarps];
};

// One thread's asynchronous copies (cp.async): a copy lands only at the wait that covers its group,
// so a read of a stage before that wait sees the stage's old bytes and the results go wrong.
struct PendingCopies {
  struct Copy {
    void* dst;
    const void* src;
  };
  std::vector<Copy> open;
  std::deque<std::vector<Copy>> groups;
};

// When a cp.async copy lands: at the wait that covers it (the latest a GPU may: a read before the
// wait sees old bytes), or at issue (the earliest: under ThreadSanitizer, a copy into a stage that
// another thread may still read is a reported race). race_check.cpp runs both.
inline bool copies_land_at_issue = false;

// The form the last emulated targets call took: "resident", "streaming" or "rows", and its tile's rows.
inline const char* last_targets_form = "";
inline int last_tile_rows = 0;

// Pointers a GPU would fault on or misread: a WMMA fragment's (32-byte aligned, as load_matrix_sync
// and store_matrix_sync require) and a cp.async copy's two ends (16 bytes). Counted by the emulated
// operations, reported after the block's threads end (emulated shared memory is 128-byte aligned, as
// the kernels' extern __shared__ is).
inline std::atomic<int> misaligned{0};

inline void check_aligned(const void* p, uintptr_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) misaligned.fetch_add(1);
}

struct HostBlock {
  using Warp = HostWarp<32>;
  BlockState* state;
  int t;
  PendingCopies* copies;
  int thread() const { return t; }
  void sync() const { state->bar.arrive_and_wait(); }
  Warp warp() const { return Warp{&state->warps[t / 32], t % 32}; }
  void copy16(void* shared, const void* global) const {
    check_aligned(shared, 16);
    check_aligned(global, 16);
    if (copies_land_at_issue) std::memcpy(shared, global, 16);
    else copies->open.push_back({shared, global});
  }
  void commit() const {
    copies->groups.push_back(std::move(copies->open));
    copies->open.clear();
  }
  template <int N>
  void wait() const {
    for (; copies->groups.size() > N; copies->groups.pop_front())
      for (const auto& c : copies->groups.front()) std::memcpy(c.dst, c.src, 16);
  }
};

// Tensor-core products as plain fp32 arithmetic on whole tiles (M x K times K x 16). Every lane
// holds the warp's whole fragment (the lanes compute the same thing); lane 0 stores it.
template <class Derived, class Stage, int kKDim>  // Derived::value: a staged element as a float
struct HostTiles {
  using A = std::array<float, 16 * kKDim>;
  using B = A;
  using Acc = std::array<float, 256>;
  static void fill(Acc& c, float v) { c.fill(v); }
  static void load_a(A& f, const Stage* p, int ld) {
    check_aligned(p, 32);
    for (int i = 0; i < 16; ++i)
      for (int k = 0; k < kKDim; ++k) f[i * kKDim + k] = Derived::value(p[i * ld + k]);
  }
  static void load_b(B& f, const Stage* p, int ld) {
    check_aligned(p, 32);
    for (int k = 0; k < kKDim; ++k)
      for (int j = 0; j < 16; ++j) f[k * 16 + j] = Derived::value(p[k * ld + j]);
  }
  // A B fragment's address as the loads take it (csrc/cuda/targets.cu's HalfMma::b_at), and a load offset elements on.
  using BAt = const Stage*;
  static BAt b_at(const Stage* p, int) { return p; }
  static void load_b(B& f, BAt at, int offset, int ld) { load_b(f, at + offset, ld); }
  static void mma(Acc& c, const A& a, const B& b) {
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) {
        float acc = 0.f;
        for (int k = 0; k < kKDim; ++k) acc += a[i * kKDim + k] * b[k * 16 + j];
        c[i * 16 + j] += acc;
      }
  }
  static void store(const HostWarp<32>& w, float* p, const Acc& c, int ld) {
    check_aligned(p, 32);
    if (w.lane() != 0) return;
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) p[i * ld + j] = c[i * 16 + j];
  }
};

// bf16/fp16 (kDtype): the map split into hi + lo parts of that dtype (by the caller), as csrc/cuda/targets.cu's HalfMma.
template <int kDtype>
struct HostHalfMma : HostTiles<HostHalfMma<kDtype>, uint16_t, 16> {
  using Stage = uint16_t;
  using Raw = Stage;
  static constexpr int kK = 16, kVec = 8;
  static constexpr bool kSplitX = false;
  static float value(uint16_t b) { return kDtype == kFloat16 ? cpu::half_bits_to_float(b) : bf16_bits_to_float(b); }
  static uint16_t bits(float v) { return kDtype == kFloat16 ? cpu::float_to_half_bits(v) : float_to_bf16_bits(v); }
};

// fp32: the map as bf16 hi + lo parts (by the caller), each landed step of the embeddings split
// into bf16 hi + lo, as csrc/cuda/targets.cu's SplitFloatMma.
struct HostSplitFloatMma : HostHalfMma<kBFloat16> {
  using Raw = float;
  static constexpr int kVec = 4;
  static constexpr bool kSplitX = true;
  static void split8(const float* x, uint16_t* hi, uint16_t* lo) {
    check_aligned(x, 16);
    check_aligned(hi, 16);
    check_aligned(lo, 16);
    for (int e = 0; e < 8; ++e) {
      hi[e] = float_to_bf16_bits(x[e]);
      lo[e] = float_to_bf16_bits(x[e] - bf16_bits_to_float(hi[e]));
    }
  }
};

// The opt-in shared-memory limit the emulated device has (sm_90's; tests set 0 to run the tile's
// streaming form where the resident form would take the call), and its shared memory per SM (sm_90's:
// two blocks of the streaming tile's 128-row form must fit it).
inline int64_t smem_optin_bytes = 232448;
inline int64_t smem_per_sm_bytes = tile::kSm90SmemPerSm;

template <class Mma, bool kVec>
void targets_tile_emulated(const TargetsArgs& a) {
  constexpr int emb_bytes = sizeof(typename Mma::Raw);
  const bool resident = tile::resident_takes(a, emb_bytes, smem_optin_bytes);
  last_targets_form = resident ? "resident" : "streaming";
  const int row_frags = tile::streaming_row_frags(a, emb_bytes, kVec, smem_per_sm_bytes);
  const int64_t bytes =
      resident ? tile::resident_smem_bytes(a, emb_bytes) : tile::smem_bytes(a, emb_bytes, row_frags);
  if (resident) last_tile_rows = tile::kRows * tile::resident_row_frags(a, emb_bytes);
  for (int blk = 0; blk < kEmulatedBlocks; ++blk) {
    BlockState state;
    std::unique_ptr<float[], void (*)(void*)> smem(
        static_cast<float*>(std::aligned_alloc(128, (bytes + 127) / 128 * 128)), std::free);
    std::memset(smem.get(), 0xff, bytes);  // NaN as fp32, bf16 and fp16: a slot read unwritten shows
    std::vector<PendingCopies> copies(tile::kThreads);
    std::vector<std::thread> threads;
    for (int t = 0; t < tile::kThreads; ++t)
      threads.emplace_back([&, t] {
        const HostBlock b{&state, t, &copies[t]};
        char* s = reinterpret_cast<char*>(smem.get());
        if (resident)
          tile::with_resident_cols(a, [&](auto cols) {
            tile::targets_tiles_resident<HostBlock, Mma, kVec, decltype(cols)::value>(b, a, s, blk, kEmulatedBlocks);
          });
        else
          tile::with_streaming_layout<kVec>(a, row_frags, [&](auto row_frags_c, auto frags) {
            constexpr int kRowFrags = decltype(row_frags_c)::value;
            if (t == 0) last_tile_rows = tile::kRows * kRowFrags;  // the instantiation that ran
            tile::targets_tiles<HostBlock, Mma, kVec, kRowFrags, decltype(frags)::value>(b, a, s, blk,
                                                                                          kEmulatedBlocks);
          });
      });
    for (auto& th : threads) th.join();
  }
  if (misaligned.exchange(0) != 0)
    throw std::runtime_error("emulated targets tile: a misaligned WMMA or cp.async pointer");
}

template <class Mma>
void targets_tile_emulated(const TargetsArgs& a) {
  if (tile::tile_vector_loads(a)) targets_tile_emulated<Mma, true>(a);
  else targets_tile_emulated<Mma, false>(a);
}

inline void targets_rows_emulated(const TargetsArgs& a) {
  last_targets_form = "rows";
  for (int wid = 0; wid < kEmulatedWarps; ++wid) {
    WarpState state;
    std::vector<float> u(warp::online_row_floats(a.C, a.S));
    run_warp([&](int lane) { tile::targets_rows(HostWarp<32>{&state, lane}, a, u.data(), wid, kEmulatedWarps); });
  }
}

// The tile's split map for race_check.cpp (the Python module gets lelp_fast.ops.targets' split):
// hi + lo parts of the stage type (bf16 for fp32 embeddings), tile::split_rows(d) x tile::split_cols(J), zero-padded.
template <class Mma>
void split_map(const TargetsArgs& a, std::vector<typename Mma::Stage>* hi, std::vector<typename Mma::Stage>* lo) {
  const int64_t rows = tile::split_rows(a.d), cols = tile::split_cols(a.J);
  hi->assign(rows * cols, 0);
  lo->assign(rows * cols, 0);
  for (int64_t k = 0; k < a.d; ++k)
    for (int64_t j = 0; j < a.J; ++j) {
      const float w = a.weight[k * a.J + j];
      (*hi)[k * cols + j] = Mma::bits(w);
      (*lo)[k * cols + j] = Mma::bits(w - Mma::value((*hi)[k * cols + j]));
    }
}

// Which kernel targets_cuda launches, run on the host (a.w_hi / w_lo: the caller's split map for the tile).
inline void targets(const TargetsArgs& a) {
  if (tile::tile_takes(a)) {
    if (a.w_hi == nullptr || a.w_lo == nullptr) throw std::invalid_argument("cuda targets: the tile needs the split map");
    if (a.emb_dtype == kBFloat16) targets_tile_emulated<HostHalfMma<kBFloat16>>(a);
    else if (a.emb_dtype == kFloat16) targets_tile_emulated<HostHalfMma<kFloat16>>(a);
    else targets_tile_emulated<HostSplitFloatMma>(a);
  } else {
    targets_rows_emulated(a);
  }
}

}  // namespace emu
}  // namespace lelp
