// CPU (OpenMP) fused distillation loss: targets (precomputed, mixed, or computed
// from the teacher embeddings), the divergence and its gradient, one pass per row.
#include "loss.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "convert.h"
#include "lane_loss.h"
#include "lelp/loss_math.h"

namespace lelp {

namespace {

// log_t += w * t in log space (log_t[k] = logaddexp(log_t[k], log w + log_tm[k])).
inline void mix_into(float* log_t, const float* log_tm, float w, int64_t K) {
  const float log_w = std::log(w);
  for (int64_t k = 0; k < K; ++k) log_t[k] = logaddexp_(log_t[k], log_w + log_tm[k]);
}

// Whether a row of log-probabilities needs a closer look: every entry <= 0 gives a sum <= 0 (or
// -Inf); NaN, +Inf and values > 0 can not (the caller's exact check decides).
__attribute__((always_inline)) inline bool log_probabilities_suspect(const float* x, int64_t K) {
  float sum = 0.f;
  LELP_SIMD_SUM(sum)
  for (int64_t k = 0; k < K; ++k) sum += x[k];
  return !(sum <= 0.f);
}

__attribute__((always_inline)) inline bool row_sum_nonfinite(const float* x, int64_t K) {
  float sum = 0.f;
  LELP_SIMD_SUM(sum)
  for (int64_t k = 0; k < K; ++k) sum += x[k];
  return !std::isfinite(sum);
}

// log t = log sum_m w_m t_m, computed as a logsumexp over teachers (zero weights skipped).
// With `check`, returns whether any teacher's row (zero-weight ones too) is suspect.
__attribute__((always_inline)) inline bool mix_row(const LossArgs& a, int64_t row, float* scratch, float* log_t,
                                                   bool check) {
  const int64_t K = a.C * a.S;
  const char* base = static_cast<const char*>(a.log_targets) +
                     row * a.targets_stride * cpu::dtype_size(a.targets_dtype);
  if (a.n_teachers == 1 && a.weights == nullptr) {
    cpu::load_row(base, a.targets_dtype, K, log_t);
    return check && log_probabilities_suspect(log_t, K);
  }
  const float* w = a.weights + row * a.n_teachers;
  bool suspect = false;
  std::fill(log_t, log_t + K, -INFINITY);
  for (int64_t m = 0; m < a.n_teachers; ++m) {
    if (w[m] == 0.f && !check) continue;  // a NaN or negative weight reaches log(): NaN, never a finite loss
    cpu::load_row(base + m * K * cpu::dtype_size(a.targets_dtype), a.targets_dtype, K, scratch);
    if (check) suspect |= log_probabilities_suspect(scratch, K);
    if (w[m] != 0.f) mix_into(log_t, scratch, w[m], K);
  }
  return suspect;
}

// Online targets of rows [r0, r0 + rows): one teacher straight into log_t, or M teachers each
// into `tile_t` (rows x K) and mixed by the per-row weights.
void online_rows(const LossArgs& a, int64_t r0, int64_t rows, TargetsWorkspace* ws, float* tile_t, float* log_t) {
  const int64_t K = a.C * a.S, step = targets_tile_rows();
  if (a.weights == nullptr) {
    for (int64_t i = 0; i < rows; i += step) targets_tile(a.online[0], r0 + i, ws[0], log_t + i * K);
    return;
  }
  std::fill(log_t, log_t + rows * K, -INFINITY);
  for (int64_t m = 0; m < a.n_teachers; ++m) {
    for (int64_t i = 0; i < rows; i += step) targets_tile(a.online[m], r0 + i, ws[m], tile_t + i * K);
    for (int64_t r = 0; r < rows; ++r) {
      const float w = a.weights[(r0 + r) * a.n_teachers + m];
      if (w != 0.f) mix_into(log_t + r * K, tile_t + r * K, w, K);
    }
  }
}

// Rows per block: long enough for the elementwise loops to vectorise (64 rows at K = 16), short
// enough that the block's six K-wide fp32 arrays and its gradient stay in L1/L2 (~2048 floats each).
constexpr int64_t kBlockRows = 64;
constexpr int64_t kBlockFloats = 2048;

int64_t block_rows(int64_t K) {
  const int64_t step = targets_tile_rows();  // online targets come in projection tiles
  const int64_t rows = std::max<int64_t>(1, std::min(kBlockRows, kBlockFloats / K) / step) * step;
  return rows;
}

// KL rows short enough for the lane layout (lane_loss.h: 16 rows across the vector lanes, no per-row
// loops); lambda != 1 with S > 1 stays row-major. Measured in docs/benchmarks.md (issue 21, K = 10).
bool lanes_cover(const LossArgs& a) {
  return a.divergence == kKL && a.C * a.S <= cpu::kLaneMaxK && (a.subclass_weight == 1.f || a.S == 1);
}

// Row stride of the block buffers. A KL row whose width is not a whole number of 8-float vectors
// (K = 39: four vectors and 7 scalar iterations in every per-row loop) is held padded to the next
// multiple of 8 with -inf logits and targets, which leave the loss and the real columns'
// gradient unchanged (block_loss_grad): when the rows are copied into the block anyway (16-bit or
// mixed inputs), or when at most a fifth of the padded row is padding (fp32 rows are otherwise
// read in place; at K = 10 the copy cost more than the padding saved). Online targets are made
// K wide, so they are not padded. Measured in docs/benchmarks.md (issue 21, odd K). KL rows of
// K <= 32 with lambda = 1 or S = 1 take the lane layout instead (lanes_cover), which needs no padding.
int64_t row_stride(const LossArgs& a) {
  const int64_t K = a.C * a.S, padded = (K + 7) / 8 * 8;
  if (lanes_cover(a) || a.divergence != kKL || a.online != nullptr || K == padded || K > 64) return K;
  const bool copied = a.student_dtype != kFloat32 || a.targets_dtype != kFloat32 || a.n_teachers != 1 ||
                      a.weights != nullptr || a.student_stride != K || a.targets_stride != K;
  return copied || (padded - K) * 4 <= K ? padded : K;
}

// Columns [K, ld) of a block's rows: -inf, so that they hold no probability.
inline void pad_rows(float* x, int64_t rows, int64_t K, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) std::fill(x + r * ld + K, x + (r + 1) * ld, -INFINITY);
}

// The folded gradient of a block (n values from row r0): scaled by *grad_scale (if any) while the
// block is in cache and stored in grad_dtype, so no backward pass reads or writes it again.
__attribute__((always_inline)) inline void store_folded_grad(const LossArgs& a, float* grad, int64_t r0, int64_t n) {
  const float scale = a.grad_scale != nullptr ? *a.grad_scale : 1.f;
  if (scale != 1.f)
    for (int64_t i = 0; i < n; ++i) grad[i] *= scale;
  if (a.grad_dtype != kFloat32)
    cpu::store_row(grad, n, a.grad_dtype, reinterpret_cast<char*>(a.grad) + r0 * a.C * a.S * cpu::dtype_size(a.grad_dtype));
}

// The same for a block held with row stride ld > K: its rows packed to stride K in place (row r
// moves down from r * ld to r * K), then stored as one contiguous block (one vectorised scale and
// conversion, not one call per short row).
__attribute__((always_inline)) inline void store_padded_grad(const LossArgs& a, float* grad, int64_t r0, int64_t rows,
                                                             int64_t K, int64_t ld) {
  for (int64_t r = 1; r < rows; ++r) std::memmove(grad + r * K, grad + r * ld, K * sizeof(float));
  store_folded_grad(a, grad, r0, rows * K);  // scales; converts and stores unless fp32
  if (a.grad_dtype == kFloat32) std::memcpy(a.grad + r0 * K, grad, rows * K * sizeof(float));
}

// Rows [r0, r0 + rows) of a contiguous (stride K) input in `dtype`, converted to fp32 with one call
// for the block, then spread to row stride ld in place (row r moves up from r * K to r * ld; nothing
// moves when ld = K).
__attribute__((always_inline)) inline void load_spread(const void* src, int dtype, int64_t r0, int64_t rows, int64_t K,
                                                       int64_t ld, float* dst) {
  cpu::load_row(static_cast<const char*>(src) + r0 * K * cpu::dtype_size(dtype), dtype, rows * K, dst);
  if (ld != K)
    for (int64_t r = rows - 1; r > 0; --r) std::memmove(dst + r * ld, dst + r * K, K * sizeof(float));
}

// Rows [r0, r0 + rows) of the loss for KL rows that lanes_cover (s, lt: the block's rows, stride
// K), in groups of kLanes transposed into G: the loss, the gradient (times *grad_scale, 0 for an
// ignored row) transposed back into grad, and the input check's bit 0 (the logits) and, with
// check_t, bit 1 (the log-targets) from the same column sums (otherwise bit 1 is the row loop's).
// A row that needs the alpha term's exact fallback is redone by block_loss_grad (work:
// loss_scratch_floats(1, K)).
__attribute__((always_inline)) inline void lanes_block(const LossArgs& a, int64_t r0, int64_t rows, const float* s,
                                                       const float* lt, bool check_t, float* grad, float* work,
                                                       cpu::LaneGroup& G) {
  constexpr int L = cpu::kLanes;
  const int K = static_cast<int>(a.C * a.S), C = static_cast<int>(a.C), S = static_cast<int>(a.S);
  const bool term = a.alpha != 0.f && a.labels != nullptr;
  const float scale = a.grad_scale != nullptr ? *a.grad_scale : 1.f;
  for (int64_t i0 = 0; i0 < rows; i0 += L) {
    const int n = static_cast<int>(std::min<int64_t>(L, rows - i0));
    const float* sr = s + i0 * K;
    const float* tr = lt + i0 * K;
    for (int k = 0; k < K; ++k)
      for (int l = 0; l < L; ++l) {
        G.s[k * L + l] = l < n ? sr[l * K + k] : 0.f;  // unused lanes: finite, discarded
        G.lt[k * L + l] = l < n ? tr[l * K + k] : 0.f;
      }
    bool ignored[L];
    for (int l = 0; l < L; ++l) {
      const int64_t y = l < n && a.labels != nullptr ? a.labels[r0 + i0 + l] : -1;
      ignored[l] = a.labels != nullptr && l < n && y == a.ignore_index;  // contributes nothing
      G.y[l] = !ignored[l] && y >= 0 && y < C ? static_cast<int32_t>(y) : -1;
    }
    cpu::kl_lanes(G, K, S, a.tau, a.alpha, a.labels != nullptr);
    if (a.suspect != nullptr) cpu::check_lanes(G, K, n, check_t, a.suspect + r0 + i0);
    float* gr = grad + i0 * K;
    for (int l = 0; l < n; ++l)
      for (int k = 0; k < K; ++k) gr[l * K + k] = ignored[l] ? 0.f : G.g[k * L + l] * scale;
    for (int l = 0; l < n; ++l) {
      const int64_t row = r0 + i0 + l;
      a.loss_rows[row] = ignored[l] ? 0.f : G.loss[l];
      if (term && a.hard_rows != nullptr) a.hard_rows[row] = ignored[l] ? 0.f : G.hard[l];
      if (!G.exact[l]) continue;
      const int64_t y = G.y[l];
      float* g = gr + l * K;
      block_loss_grad(1, sr + l * K, tr + l * K, C, S, kKL, a.jsd_beta, a.tau, a.alpha, &y, work, g,
                      a.loss_rows + row, a.hard_rows != nullptr ? a.hard_rows + row : nullptr, a.subclass_weight, K);
      for (int k = 0; k < K; ++k) g[k] *= scale;
    }
  }
}

// Tiles [t_begin, t_end) of the loss. Inlined into a generic and an AVX2/FMA build of the same loops.
__attribute__((always_inline)) inline void loss_range(const LossArgs& a, int64_t t_begin, int64_t t_end,
                                                      int64_t tile, TargetsWorkspace* ws, float* buf,
                                                      int64_t* labels) {
  const int64_t K = a.C * a.S, ld = row_stride(a);
  float* s = buf;                       // tile x ld student logits (fp32)
  float* log_t = s + tile * ld;         // tile x ld targets
  float* scratch = log_t + tile * ld;   // tile x ld, for mixing teachers
  float* work = scratch + tile * ld;    // loss_scratch_floats(tile, ld)
  float* grad_tile = work + loss_scratch_floats(tile, ld);  // tile x ld, for a gradient stored in 16 bits or padded
  const bool lanes = lanes_cover(a);
  cpu::LaneGroup lane_group;  // only used when lanes
  const int64_t student_row_bytes = a.student_stride * cpu::dtype_size(a.student_dtype);
  // Contiguous fp32 inputs are read in place (no copy into the block buffers) unless padded.
  const bool s_direct = a.student_dtype == kFloat32 && a.student_stride == K && ld == K;
  const bool t_direct = ws == nullptr && a.targets_dtype == kFloat32 && a.n_teachers == 1 &&
                        a.weights == nullptr && a.targets_stride == K && ld == K;
  // Other contiguous inputs (16-bit, or padded) are converted once per block, then spread to the
  // row stride (load_spread); strided rows and mixed teachers go row by row.
  const bool s_spread = !s_direct && a.student_stride == K;
  const bool t_spread = !t_direct && ws == nullptr && a.n_teachers == 1 && a.weights == nullptr && a.targets_stride == K;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t r0 = t * tile;
    const int64_t rows = std::min(tile, a.n - r0);
    const float* s_blk = s_direct ? static_cast<const float*>(a.student) + r0 * K : s;
    const float* t_blk = t_direct ? static_cast<const float*>(a.log_targets) + r0 * K : log_t;
    if (ws != nullptr) online_rows(a, r0, rows, ws, scratch, log_t);
    if (s_spread) load_spread(a.student, a.student_dtype, r0, rows, K, ld, s);
    if (t_spread) load_spread(a.log_targets, a.targets_dtype, r0, rows, K, ld, log_t);
    const bool check = a.suspect != nullptr;
    // The lane layout checks the logits and a single offline teacher's rows itself (lanes_block).
    const bool rows_loop = !lanes || !(s_direct || s_spread) || !(t_direct || t_spread);
    for (int64_t r = 0; r < rows && rows_loop; ++r) {
      const int64_t row = r0 + r;
      bool t_suspect = false;
      if (t_direct || t_spread)
        t_suspect = check && !lanes && log_probabilities_suspect(t_blk + r * ld, K);
      else if (ws == nullptr)
        t_suspect = mix_row(a, row, scratch, log_t + r * ld, check);
      if (!s_direct && !s_spread)
        cpu::load_row(static_cast<const char*>(a.student) + row * student_row_bytes, a.student_dtype, K, s + r * ld);
      if (check)
        a.suspect[row] = static_cast<uint8_t>((!lanes && row_sum_nonfinite(s_blk + r * ld, K)) | (t_suspect << 1));
      labels[r] = a.labels != nullptr ? a.labels[row] : -1;
      if (a.labels != nullptr && labels[r] == a.ignore_index) labels[r] = -1;
    }
    if (ld != K) {
      pad_rows(s, rows, K, ld);
      pad_rows(log_t, rows, K, ld);
    }
    // forward only (a.grad == nullptr): the gradient goes to the tile's scratch and is not stored
    const bool store = a.grad != nullptr;
    float* grad = store && a.grad_dtype == kFloat32 && ld == K ? a.grad + r0 * K : grad_tile;
    if (lanes) {  // scaled, ignored rows zeroed; stored here unless fp32
      lanes_block(a, r0, rows, s_blk, t_blk, t_direct || t_spread, grad, work, lane_group);
      if (store && a.grad_dtype != kFloat32)
        cpu::store_row(grad, rows * K, a.grad_dtype,
                       reinterpret_cast<char*>(a.grad) + r0 * K * cpu::dtype_size(a.grad_dtype));
      continue;
    }
    block_loss_grad(rows, s_blk, t_blk, static_cast<int>(a.C), static_cast<int>(a.S), a.divergence, a.jsd_beta, a.tau, a.alpha,
                    a.labels != nullptr ? labels : nullptr, work, grad, a.loss_rows + r0,
                    a.hard_rows != nullptr ? a.hard_rows + r0 : nullptr, a.subclass_weight, ld);
    if (a.labels != nullptr) {  // ignored rows contribute nothing
      for (int64_t r = 0; r < rows; ++r) {
        if (a.labels[r0 + r] == a.ignore_index) {
          a.loss_rows[r0 + r] = 0.f;
          if (a.hard_rows != nullptr) a.hard_rows[r0 + r] = 0.f;
          std::fill(grad + r * ld, grad + r * ld + K, 0.f);
        }
      }
    }
    if (!store)
      continue;
    if (ld != K)
      store_padded_grad(a, grad, r0, rows, K, ld);
    else if (a.grad_scale != nullptr || a.grad_dtype != kFloat32)
      store_folded_grad(a, grad, r0, rows * K);
  }
}

using LossRangeFn = void (*)(const LossArgs&, int64_t, int64_t, int64_t, TargetsWorkspace*, float*, int64_t*);

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LELP_HAVE_AVX2_LOSS 1
__attribute__((target("avx2,fma,f16c"))) void loss_range_avx2(const LossArgs& a, int64_t b, int64_t e,
                                                              int64_t tile, TargetsWorkspace* ws, float* buf,
                                                              int64_t* labels) {
  loss_range(a, b, e, tile, ws, buf, labels);
}
// AVX-512 (16-wide loops; GCC's default tuning would stay at 256 bits without prefer-vector-width).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,prefer-vector-width=512"))) void
loss_range_avx512(const LossArgs& a, int64_t b, int64_t e, int64_t tile, TargetsWorkspace* ws, float* buf,
                  int64_t* labels) {
  loss_range(a, b, e, tile, ws, buf, labels);
}
#endif

void loss_range_portable(const LossArgs& a, int64_t b, int64_t e, int64_t tile, TargetsWorkspace* ws,
                         float* buf, int64_t* labels) {
  loss_range(a, b, e, tile, ws, buf, labels);
}

// LELP_FAST_CPU_ISA=portable / avx2 caps the loss's instruction set (tests force each path).
LossRangeFn pick_loss_range() {
#ifdef LELP_HAVE_AVX2_LOSS
  const char* cap = std::getenv("LELP_FAST_CPU_ISA");
  const bool avx2 = std::strcmp(cpu_isa(), "avx2") == 0;  // "portable" when forced or unsupported
  if (avx2 && (cap == nullptr || std::strcmp(cap, "avx2") != 0) && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return loss_range_avx512;
  if (avx2) return loss_range_avx2;
#endif
  return loss_range_portable;
}

LossRangeFn loss_range_fn() {
  static const LossRangeFn fn = pick_loss_range();
  return fn;
}

// out[r, :] = grad[r, :] * rows[r], stored in `dtype` (the backward's scale and cast in one pass).
__attribute__((always_inline)) inline void scale_rows_range(const float* grad, const float* rows, int64_t K,
                                                            int dtype, void* out, int64_t r0, int64_t r1,
                                                            float* buf) {
  for (int64_t r = r0; r < r1; ++r) {
    const float w = rows[r];
    const float* g = grad + r * K;
    for (int64_t k = 0; k < K; ++k) buf[k] = g[k] * w;
    cpu::store_row(buf, K, dtype, static_cast<char*>(out) + r * K * cpu::dtype_size(dtype));
  }
}

#ifdef LELP_HAVE_AVX2_LOSS
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,prefer-vector-width=512"))) void
scale_rows_avx512(const float* grad, const float* rows, int64_t K, int dtype, void* out, int64_t r0, int64_t r1,
                  float* buf) {
  scale_rows_range(grad, rows, K, dtype, out, r0, r1, buf);
}
__attribute__((target("avx2,fma,f16c"))) void scale_rows_avx2(const float* grad, const float* rows, int64_t K,
                                                              int dtype, void* out, int64_t r0, int64_t r1,
                                                              float* buf) {
  scale_rows_range(grad, rows, K, dtype, out, r0, r1, buf);
}
#endif

void scale_rows_portable(const float* grad, const float* rows, int64_t K, int dtype, void* out, int64_t r0,
                         int64_t r1, float* buf) {
  scale_rows_range(grad, rows, K, dtype, out, r0, r1, buf);
}

}  // namespace

void scale_rows_cpu(const float* grad, const float* rows, int64_t n, int64_t K, int dtype, void* out) {
  auto fn = scale_rows_portable;
#ifdef LELP_HAVE_AVX2_LOSS
  if (loss_range_fn() == loss_range_avx512) fn = scale_rows_avx512;
  if (loss_range_fn() == loss_range_avx2) fn = scale_rows_avx2;
#endif
  const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 16) / K);  // rows per dynamic chunk
  const int64_t n_chunks = (n + chunk - 1) / chunk;
#pragma omp parallel if (n_chunks > 1)
  {
    std::vector<float> buf(K);
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t c = 0; c < n_chunks; ++c) fn(grad, rows, K, dtype, out, c * chunk, std::min(n, (c + 1) * chunk), buf.data());
  }
}

const char* loss_isa() {
#ifdef LELP_HAVE_AVX2_LOSS
  if (loss_range_fn() == loss_range_avx512) return "avx512";
  if (loss_range_fn() == loss_range_avx2) return "avx2";
#endif
  return "portable";
}

void loss_cpu(const LossArgs& a) {
  const int64_t K = a.C * a.S, ld = row_stride(a);
  const int64_t tile = block_rows(ld);
  const int64_t n_tiles = (a.n + tile - 1) / tile;
  // Chunks of about 64 K elements handed out dynamically: on a shared machine a thread that loses
  // its core leaves its remaining chunks to the others instead of holding the barrier (a static
  // split waits for the slowest thread). Small enough for balance, large enough to amortise the call.
  const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 16) / (tile * K));
  const int64_t n_chunks = (n_tiles + chunk - 1) / chunk;
  LossRangeFn range = loss_range_fn();
#ifdef LELP_HAVE_AVX2_LOSS
  // AVX-512 only where rows are whole 16-float vectors and long: an A/B here (docs/benchmarks.md,
  // issue 21) had it 0.87-0.97x the AVX2 build at K = 16 and 40 (per-row remainder loops) and 1.15x at K = 128.
  // The lane layout's 16 rows fill one AVX-512 vector per column (two AVX2 ones), so it keeps AVX-512.
  if (range == loss_range_avx512 && (K % 16 != 0 || K < 64) && !lanes_cover(a)) range = loss_range_avx2;
#endif
  // LELP_FAST_LOSS_SCHEDULE=static: the former split (contiguous halves), kept for A/B runs.
  const char* schedule = std::getenv("LELP_FAST_LOSS_SCHEDULE");
  const bool split_static = schedule != nullptr && std::strcmp(schedule, "static") == 0;
#pragma omp parallel if (n_chunks > 1)
  {
    std::vector<float> buf(4 * tile * ld + loss_scratch_floats(tile, ld));
    std::vector<int64_t> labels(tile);
    std::vector<TargetsWorkspace> workspaces;  // one per online teacher
    if (a.online != nullptr)
      for (int64_t m = 0; m < a.n_teachers; ++m) workspaces.emplace_back(a.online[m]);
    TargetsWorkspace* ws = workspaces.empty() ? nullptr : workspaces.data();
    if (split_static) {
      const int nt = omp_get_num_threads(), id = omp_get_thread_num();
      range(a, n_tiles * id / nt, n_tiles * (id + 1) / nt, tile, ws, buf.data(), labels.data());
    } else {
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t c = 0; c < n_chunks; ++c)
        range(a, c * chunk, std::min(n_tiles, (c + 1) * chunk), tile, ws, buf.data(), labels.data());
    }
  }
}

}  // namespace lelp
