// A host stand-in for lelp::cuda::DeviceWarp: the 32 lanes of a warp are 32 threads, a shuffle
// butterfly is a barrier plus the same butterfly over the lanes' values (so every lane gets the
// value, rounding included, that the GPU's shuffles give), __syncwarp is the barrier.
#pragma once

#include <barrier>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

#include "../../csrc/cpu/convert.h"

namespace lelp {
namespace emu {

struct WarpState {
  std::barrier<> bar{32};
  float slot[32];
};

template <int W>
struct HostWarp {
  static constexpr int kWidth = W;
  WarpState* state;
  int lane_;

  int lane() const { return lane_; }
  template <class Op>
  float butterfly(float v, Op op, int n = W) const {  // levels with offset < n only (n <= W)
    state->slot[lane_] = v;
    state->bar.arrive_and_wait();
    float vals[32];
    for (int l = 0; l < 32; ++l) vals[l] = state->slot[l];
    state->bar.arrive_and_wait();  // every lane has read the slots before any lane writes again
    for (int o = W / 2; o > 0; o >>= 1) {
      float next[32];
      for (int l = 0; l < 32; ++l) next[l] = o < n ? op(vals[l], vals[l ^ o]) : vals[l];
      for (int l = 0; l < 32; ++l) vals[l] = next[l];
    }
    return vals[lane_];
  }
  float sum(float v) const { return butterfly(v, [](float a, float b) { return a + b; }); }
  float max(float v) const { return butterfly(v, [](float a, float b) { return fmax_(a, b); }); }
  float sum_within(float v, int n) const { return butterfly(v, [](float a, float b) { return a + b; }, n); }
  float from_lane(float v, int l) const {  // lane l's v, like __shfl_sync
    state->slot[lane_] = v;
    state->bar.arrive_and_wait();
    const float x = state->slot[l];
    state->bar.arrive_and_wait();
    return x;
  }
  float xor_lane(float v, int o) const { return from_lane(v, lane_ ^ o); }
  bool any(bool p) const {  // over the warp, like __any_sync
    state->slot[lane_] = p ? 1.f : 0.f;
    state->bar.arrive_and_wait();
    bool out = false;
    for (int l = 0; l < 32; ++l) out = out || state->slot[l] != 0.f;
    state->bar.arrive_and_wait();
    return out;
  }
  void sync() const { state->bar.arrive_and_wait(); }

  static float load(const void* p, int dtype, int64_t i) {
    if (dtype == kFloat32) return static_cast<const float*>(p)[i];
    const uint16_t b = static_cast<const uint16_t*>(p)[i];
    return dtype == kFloat16 ? cpu::half_bits_to_float(b) : bf16_bits_to_float(b);
  }
  static void load4(const void* p, int dtype, int64_t i, float* v) {
    for (int e = 0; e < 4; ++e) v[e] = load(p, dtype, i + e);
  }
  static void store(void* p, int dtype, int64_t i, float v) {
    if (dtype == kFloat32) static_cast<float*>(p)[i] = v;
    else static_cast<uint16_t*>(p)[i] = dtype == kFloat16 ? cpu::float_to_half_bits(v) : float_to_bf16_bits(v);
  }
  static void store4(void* p, int dtype, int64_t i, const float* v) {
    for (int e = 0; e < 4; ++e) store(p, dtype, i + e, v[e]);
  }
};

// Runs body(lane) on 32 threads, one warp.
inline void run_warp(const std::function<void(int)>& body) {
  std::vector<std::thread> lanes;
  for (int l = 0; l < 32; ++l) lanes.emplace_back(body, l);
  for (auto& t : lanes) t.join();
}

}  // namespace emu
}  // namespace lelp
