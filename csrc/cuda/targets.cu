// CUDA fused targets: a tensor-core tile (bf16/fp16 with a split map, fp32 split into bf16 too; resident
// in shared memory and persistent when the map fits), a warp per row for wider maps
// (lelp/block_targets.h; the epilogue's math is lelp/row_math.h's).
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../cpu/targets.h"
#include "lelp/block_targets.h"
#include "warp.cuh"

namespace lelp {
namespace {

namespace wmma = nvcuda::wmma;

struct DeviceBlock {
  using Warp = cuda::DeviceWarp<32>;
  __device__ __forceinline__ int thread() const { return threadIdx.x; }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
  __device__ __forceinline__ Warp warp() const { return Warp{}; }
  // cp.async (sm_80+): 16 bytes global -> shared without a register round trip, bypassing L1 (.cg:
  // each byte is read once per tile).
  __device__ __forceinline__ void copy16(void* shared, const void* global) const {
    const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(shared));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(global) : "memory");
  }
  __device__ __forceinline__ void commit() const { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
  template <int N>
  __device__ __forceinline__ void wait() const {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
  }
};

// The 128-row streaming tile's block: the thread index read at each use, not one value kept live
// across the kernel (at the 128 registers of two blocks an SM, bf16's spilled it on sm_80; the
// other kernels keep DeviceBlock's, whose reads once cost them nothing).
struct TidAtUseBlock : DeviceBlock {
  __device__ __forceinline__ int thread() const {
    int t;
    asm volatile("mov.u32 %0, %%tid.x;" : "=r"(t));
    return t;
  }
};

// A bf16 WMMA A fragment (row-major, 16 x 16 x 16: four 32-bit registers) loaded from shared memory:
// the PTX wmma.load that wmma::load_matrix_sync emits, with the .shared state space. nvcc 13 emits
// bf16's with a generic address, which ptxas lowers to 4 LD.E a fragment (and 4 MOVM more for a B);
// with .shared it takes one LDSM, as fp16's inferred address space already does. The instruction
// (shape, layout, type) fixes the fragment's contents; the state space only says where p points.
__device__ __forceinline__ void load_bf16_a_shared(unsigned (&r)[4], const void* p, int ld) {
  const unsigned at = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("wmma.load.a.sync.aligned.row.m16n16k16.shared.bf16 {%0, %1, %2, %3}, [%4], %5;\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(at), "r"(ld) : "memory");
}

// The shared-memory address this lane gives ldmatrix for a bf16 B fragment (row-major, 16 x 16 x
// 16) at p: row lane % 16, columns 8 (lane / 16) .. + 7. That is how ptxas addresses the one LDSM
// (.x4.trans) it makes of "wmma.load.b.sync.aligned.row.m16n16k16.shared.bf16" (the B loads' form
// until session 54, as load_bf16_a_shared's for A), into the same four registers; but it recomputed
// the lane offset from %laneid and ld for every fragment (eight instructions a load, at the 128
// registers of two blocks an SM). Taken once a step (HalfMma::b_at), a step's fragments load at
// constant offsets from it.
__device__ __forceinline__ unsigned bf16_b_lane_address(const void* p, int ld) {
  unsigned lane;
  asm("mov.u32 %0, %%laneid;" : "=r"(lane));
  return static_cast<unsigned>(__cvta_generic_to_shared(p)) + 2 * ((lane % 16) * ld + lane / 16 * 8);
}

__device__ __forceinline__ void load_bf16_b_ldmatrix(unsigned (&r)[4], unsigned at) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(at) : "memory");
}

// bf16/fp16 embeddings: WMMA 16 x 16 x 16 on T, the map split into hi + lo parts of T.
template <class T>
struct HalfMma {
  using Stage = uint16_t;
  using Raw = Stage;
  static constexpr int kK = 16, kVec = 8;
  static constexpr bool kSplitX = false;
  static constexpr int kMinBlocks = 2;  // per SM: 128 registers a thread
  using A = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
  using B = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  static __device__ __forceinline__ void fill(Acc& c, float v) { wmma::fill_fragment(c, v); }
  static_assert(!std::is_same_v<T, __nv_bfloat16> || (sizeof(A) == 16 && sizeof(B) == 16),
                "a bf16 fragment in four 32-bit registers (load_bf16_a_shared, load_bf16_b_ldmatrix)");
  static __device__ __forceinline__ void load_a(A& f, const Stage* p, int ld) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>)
      load_bf16_a_shared(reinterpret_cast<unsigned(&)[4]>(f), p, ld);
    else
      wmma::load_matrix_sync(f, reinterpret_cast<const T*>(p), ld);
  }
  // B fragments at b_at(p, ld) + offset elements (block_targets.h): bf16's at this lane's ldmatrix
  // address, fp16's at the pointer wmma::load_matrix_sync takes (with ld).
  using BAt = std::conditional_t<std::is_same_v<T, __nv_bfloat16>, unsigned, const Stage*>;
  static __device__ __forceinline__ BAt b_at(const Stage* p, int ld) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) return bf16_b_lane_address(p, ld);
    else return p;
  }
  static __device__ __forceinline__ void load_b(B& f, BAt at, int offset, int ld) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>)
      load_bf16_b_ldmatrix(reinterpret_cast<unsigned(&)[4]>(f), at + 2 * offset);
    else
      wmma::load_matrix_sync(f, reinterpret_cast<const T*>(at + offset), ld);
  }
  static __device__ __forceinline__ void mma(Acc& c, const A& a, const B& b) { wmma::mma_sync(c, a, b, c); }
  static __device__ __forceinline__ void store(const cuda::DeviceWarp<32>&, float* p, const Acc& c, int ld) {
    wmma::store_matrix_sync(p, c, ld, wmma::mem_row_major);
  }
};

// fp32 embeddings: staged as fp32, each landed step split in shared memory into bf16 hi + lo
// (split8), three bf16 products against the map's bf16 hi + lo parts (block_targets.h).
struct SplitFloatMma : HalfMma<__nv_bfloat16> {
  using Raw = float;
  static constexpr int kVec = 4;
  static constexpr bool kSplitX = true;
  static constexpr int kMinBlocks = 2;  // per SM: 128 registers a thread
  // hi = bf16(x), lo = bf16(x - hi) (x - hi is exact in fp32), for 8 values: two 16-byte loads,
  // one 16-byte store a part.
  static __device__ __forceinline__ void split8(const float* x, Stage* hi, Stage* lo) {
    const float4 v[2] = {reinterpret_cast<const float4*>(x)[0], reinterpret_cast<const float4*>(x)[1]};
    const float* f = reinterpret_cast<const float*>(v);
    __align__(16) __nv_bfloat162 h[4], l[4];  // read back as one 16-byte word each
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
      const float2 back = __bfloat1622float2(h[i]);
      l[i] = __floats2bfloat162_rn(f[2 * i] - back.x, f[2 * i + 1] - back.y);
    }
    *reinterpret_cast<uint4*>(hi) = *reinterpret_cast<const uint4*>(h);
    *reinterpret_cast<uint4*>(lo) = *reinterpret_cast<const uint4*>(l);
  }
};

template <class Mma, bool kVec, int kRowFrags, int kFrags>
__global__ void __launch_bounds__(tile::kThreads, Mma::kMinBlocks) targets_tile_kernel(TargetsArgs a) {
  extern __shared__ __align__(128) char smem[];
  using Block = std::conditional_t<kRowFrags == 2, TidAtUseBlock, DeviceBlock>;
  tile::targets_tiles<Block, Mma, kVec, kRowFrags, kFrags>(Block{}, a, smem, blockIdx.x, gridDim.x);
}

// One block per SM, so that the registers may take the whole file (up to 255 a thread at any map
// width; at 2 blocks' 128 the bf16 form spilled 40 B on sm_90): at the maps the form is for
// (d = 768, 16 or 32 columns) its shared memory leaves no room for a second block anyway.
template <class Mma, bool kVec, int kCols>
__global__ void __launch_bounds__(tile::kThreads, 1) targets_resident_kernel(TargetsArgs a) {
  extern __shared__ __align__(128) char smem[];
  tile::targets_tiles_resident<DeviceBlock, Mma, kVec, kCols>(DeviceBlock{}, a, smem, blockIdx.x, gridDim.x);
}

__global__ void __launch_bounds__(128, 4) targets_row_kernel(TargetsArgs a) {
  extern __shared__ float row_smem[];  // K + C floats per warp
  const int warp_in_block = threadIdx.x / 32;
  float* u = row_smem + warp_in_block * warp::online_row_floats(a.C, a.S);
  tile::targets_rows(cuda::DeviceWarp<32>{}, a, u, static_cast<int64_t>(blockIdx.x) * 4 + warp_in_block,
                     static_cast<int64_t>(gridDim.x) * 4);
}

void check(cudaError_t err) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("cuda targets: ") + cudaGetErrorString(err));
}

int current_device() {
  int device = 0;
  check(cudaGetDevice(&device));
  return device;
}

// The device's opt-in shared-memory limit, shared memory per SM and SM count, read once per device
// (kept for the first 64).
struct DeviceFacts {
  int smem_optin = 0, smem_per_sm = 0, sms = 0;
};

DeviceFacts device_facts(int device) {
  static DeviceFacts known[64];
  if (device < 64 && known[device].sms > 0) return known[device];
  DeviceFacts f;
  check(cudaDeviceGetAttribute(&f.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  check(cudaDeviceGetAttribute(&f.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  check(cudaDeviceGetAttribute(&f.sms, cudaDevAttrMultiProcessorCount, device));
  if (device < 64) known[device] = f;
  return f;
}

// More than 48 KB of shared memory needs an opt-in (the resident form takes up to the device's
// limit). It is set once per kernel and device for the largest size needed, so that a CUDA-graph
// capture after a warm-up run makes no such call. opted_in: the kernel's sizes so far, per device.
template <class Kernel>
void opt_in(Kernel kernel, int device, int64_t smem, int* opted_in) {
  if (smem > 48 * 1024 && (device >= 64 || opted_in[device] < smem)) {
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    if (device < 64) opted_in[device] = static_cast<int>(smem);
  }
}

// The resident form: a persistent grid of as many blocks as the SMs hold (the occupancy read once
// per device and size), each looping over its tiles.
template <class Mma, bool kVec, int kCols>
void launch_resident(const TargetsArgs& a, int device, cudaStream_t stream) {
  const int64_t rows = int64_t{tile::kRows} * tile::resident_row_frags(a, sizeof(typename Mma::Raw));
  const int64_t tiles = (a.n + rows - 1) / rows;
  static int opted_in[64] = {};
  static int64_t sized[64] = {};  // the shared memory per_sm was read for
  static int per_sm[64] = {};
  const int64_t smem = tile::resident_smem_bytes(a, sizeof(typename Mma::Raw));
  auto kernel = targets_resident_kernel<Mma, kVec, kCols>;
  opt_in(kernel, device, smem, opted_in);
  int blocks_per_sm = device < 64 && sized[device] == smem ? per_sm[device] : 0;
  if (blocks_per_sm == 0) {
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, tile::kThreads,
                                                        static_cast<size_t>(smem)));
    blocks_per_sm = std::max(blocks_per_sm, 1);
    if (device < 64) sized[device] = smem, per_sm[device] = blocks_per_sm;
  }
  const int64_t blocks = std::min<int64_t>(tiles, int64_t{blocks_per_sm} * device_facts(device).sms);
  kernel<<<static_cast<unsigned>(blocks), tile::kThreads, smem, stream>>>(a);
}

// The resident form when the map fits the device's shared memory, else the streaming tile (a
// block per tile). kVec: tile_vector_loads.
template <class Mma, bool kVec>
void launch_tile(const TargetsArgs& a, cudaStream_t stream) {
  constexpr int emb_bytes = sizeof(typename Mma::Raw);
  const int device = current_device();
  if (tile::resident_takes(a, emb_bytes, device_facts(device).smem_optin)) {
    tile::with_resident_cols(a, [&](auto cols) {
      launch_resident<Mma, kVec, decltype(cols)::value>(a, device, stream);
    });
    return;
  }
  const int row_frags = tile::streaming_row_frags(a, emb_bytes, kVec, device_facts(device).smem_per_sm);
  tile::with_streaming_layout<kVec>(a, row_frags, [&](auto row_frags_c, auto frags) {
    constexpr int kRowFrags = decltype(row_frags_c)::value;
    static int opted_in[64] = {};
    const int64_t smem = tile::smem_bytes(a, emb_bytes, kRowFrags), rows = int64_t{tile::kRows} * kRowFrags;
    auto kernel = targets_tile_kernel<Mma, kVec, kRowFrags, decltype(frags)::value>;
    opt_in(kernel, device, smem, opted_in);
    const int64_t blocks = std::min<int64_t>((a.n + rows - 1) / rows, int64_t{1} << 20);
    kernel<<<static_cast<unsigned>(blocks), tile::kThreads, smem, stream>>>(a);
  });
}

template <class Mma>
void launch_tile(const TargetsArgs& a, cudaStream_t stream) {
  if (tile::tile_vector_loads(a)) launch_tile<Mma, true>(a, stream);
  else launch_tile<Mma, false>(a, stream);
}

}  // namespace

void targets_cuda(const TargetsArgs& a, void* stream_handle) {
  if (a.C * a.S > 512) throw std::invalid_argument("cuda targets: K = C*S must be <= 512");
  if (a.n == 0) return;
  const auto stream = static_cast<cudaStream_t>(stream_handle);
  if (tile::tile_takes(a)) {
    if (a.w_hi == nullptr || a.w_lo == nullptr) throw std::invalid_argument("cuda targets: the tile needs the split map");
    if (a.emb_dtype == kBFloat16) launch_tile<HalfMma<__nv_bfloat16>>(a, stream);
    else if (a.emb_dtype == kFloat16) launch_tile<HalfMma<__half>>(a, stream);
    else launch_tile<SplitFloatMma>(a, stream);
  } else {
    const int64_t blocks = std::min<int64_t>((a.n + 3) / 4, int64_t{1} << 20);
    const size_t smem = sizeof(float) * 4 * warp::online_row_floats(a.C, a.S);
    targets_row_kernel<<<static_cast<unsigned>(blocks), 128, smem, stream>>>(a);
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("cuda targets launch failed: ") + cudaGetErrorString(err));
}

}  // namespace lelp
