// Sanitizers over the CUDA kernels' bodies (tests/test_cuda_emulated.py builds this twice).
// ThreadSanitizer: every lane of an emulated warp or block is a thread and every __syncwarp /
// __syncthreads a barrier, so a shared-memory access the kernel does not order with a barrier is
// reported as a data race -- the class of GPU bug that matching the reference cannot show.
// AddressSanitizer: every buffer (shared memory included) is an exact-size heap allocation, so a
// read or write past one is reported, as compute-sanitizer's memcheck would on a GPU.
// Covers each loss lane layout (precomputed, mixed and online targets, hard labels; KL at a subclass
// weight lambda != 1 with its class sums in registers and in shared memory) and the targets
// tile in all three precisions (resident and streaming) plus the row kernel. Prints "ok: ran R of N
// checks" when it finishes; `race_check PART PARTS` runs every PARTS-th check from the PART-th (0-based).
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "emulate.h"

namespace {

std::mt19937 rng(7);

// This process's share of the checks (race_check PART PARTS): tests/test_cuda_emulated.py runs the
// parts side by side, one a core.
int part = 0, parts = 1, calls = 0, ran = 0;

bool mine() {
  const bool is_mine = calls++ % parts == part;
  ran += is_mine;
  return is_mine;
}

std::vector<float> randn(size_t n, float scale = 1.f) {
  std::normal_distribution<float> dist(0.f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

std::vector<uint16_t> as_bits(const std::vector<float>& v, int dtype) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i)
    out[i] = dtype == lelp::kFloat16 ? lelp::cpu::float_to_half_bits(v[i]) : lelp::float_to_bf16_bits(v[i]);
  return out;
}

lelp::TargetsArgs teacher(int64_t n, int64_t d, int64_t C, int64_t S, bool head, const std::vector<float>& emb,
                          const std::vector<float>& weight, const std::vector<float>& bias, const std::vector<float>& z) {
  lelp::TargetsArgs t{};
  t.embeddings = emb.data();
  t.emb_dtype = lelp::kFloat32;
  t.emb_stride = d;
  t.n = n;
  t.d = d;
  t.weight = weight.data();
  t.bias = bias.data();
  t.J = C * S + (head ? C : 0);
  t.logits = head ? nullptr : z.data();
  t.logits_dtype = lelp::kFloat32;
  t.logits_stride = C;
  t.C = C;
  t.S = S;
  t.inv_beta = 2.f;
  t.inv_tau = 0.5f;
  return t;
}

void check_loss(int64_t C, int64_t S, int teachers, bool online, int divergence = lelp::kJS, float lambda = 1.f,
                bool far = false) {
  if (!mine()) return;
  const int64_t n = 41, K = C * S, d = 13;
  auto student = randn(n * K, 3.f), log_t = randn(n * teachers * K), grad = std::vector<float>(n * K);
  if (far)  // class 0 of every third row far below the rest: the warps' exact class sums
    for (int64_t i = 0; i < n; i += 3)
      for (int64_t k = 0; k < S; ++k) student[i * K + k] -= 300.f;
  auto loss = std::vector<float>(n), hard = std::vector<float>(n), weights = std::vector<float>(n * teachers, 0.5f);
  std::vector<int64_t> labels(n);
  for (int64_t i = 0; i < n; ++i) labels[i] = i % 7 == 3 ? -100 : i % C;
  std::vector<std::vector<float>> emb, w, b, z;
  std::vector<lelp::TargetsArgs> online_args;
  for (int m = 0; m < teachers; ++m) {
    const bool head = m == 0;
    emb.push_back(randn(n * d));
    w.push_back(randn(d * (K + C)));
    b.push_back(randn(K + C));
    z.push_back(randn(n * C));
    online_args.push_back(teacher(n, d, C, S, head, emb.back(), w.back(), b.back(), z.back()));
  }
  lelp::LossArgs a{student.data(), lelp::kFloat32, K, n, C, S, online ? nullptr : log_t.data(), lelp::kFloat32,
                   teachers * K, teachers, teachers > 1 ? weights.data() : nullptr,
                   online ? online_args.data() : nullptr, labels.data(), -100, lelp::kJS, 0.5f, 2.f, 0.1f,
                   loss.data(), hard.data(), grad.data()};
  a.divergence = divergence;
  a.subclass_weight = lambda;  // KL at lambda != 1: the class sums in registers or shared memory
  lelp::emu::loss(a);
}

void check_targets(int64_t C, int64_t S, int dtype, bool head, int64_t n = 70, int64_t d = 40) {
  if (!mine()) return;
  const int64_t K = C * S, J = K + (head ? C : 0);
  auto x = randn(n * d), weight = randn(d * J), bias = randn(J), z = randn(n * C), out = std::vector<float>(n * K);
  auto bits = as_bits(x, dtype);
  lelp::TargetsArgs a = teacher(n, d, C, S, head, x, weight, bias, z);
  if (dtype != lelp::kFloat32) a.embeddings = bits.data();
  a.emb_dtype = dtype;
  a.out = out.data();
  a.out_dtype = lelp::kFloat32;
  a.out_stride = K;
  std::vector<uint16_t> hi, lo;
  if (dtype == lelp::kFloat16) lelp::emu::split_map<lelp::emu::HostHalfMma<lelp::kFloat16>>(a, &hi, &lo);
  else lelp::emu::split_map<lelp::emu::HostHalfMma<lelp::kBFloat16>>(a, &hi, &lo);  // fp32 embeddings: bf16 too
  a.w_hi = hi.data(), a.w_lo = lo.data();
  lelp::emu::targets(a);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 3) part = std::atoi(argv[1]), parts = std::atoi(argv[2]);
  // every (W, CH) of warp::loss_shape (tests/test_cuda_emulated.py: LANE_LAYOUT_SHAPES)
  const int64_t shapes[][2] = {{3, 1}, {2, 4}, {3, 4}, {2, 8}, {2, 12}, {2, 16}, {5, 8}, {2, 32},
                               {3, 30}, {4, 25}, {5, 32}, {2, 100}, {2, 128}, {3, 100}, {5, 80}};
  for (const auto& cs : shapes) {
    check_loss(cs[0], cs[1], 1, false);
    check_loss(cs[0], cs[1], 2, false);
    check_loss(cs[0], cs[1], 1, true);
    check_loss(cs[0], cs[1], 2, true);
  }
  // lambda != 1: classes of whole chunks (S = 4, 8, 32, 16: in registers; 4 x 32 reduce-scattered over
  // runs of 8 lanes; S = 5, 10, 80 with one precomputed teacher and at most 32 chunks of 5, at each of
  // their 8 layouts: 2 x 5, 3 x 5, 6 x 5, 8 x 5, 12 x 5, 16 x 5, 12 x 10, 2 x 80) and the others
  // (S = 12, 25, 80, 5 at 34 x 5 and with online targets, and K not a multiple of 4: through shared
  // memory, which online targets share; C = 1, S = 2 fills the scratch exactly), each also with a
  // class far below its row (the exact class sums)
  const int64_t weighted[][2] = {{2, 4}, {5, 8}, {2, 32}, {5, 16}, {4, 32}, {2, 12}, {4, 25}, {5, 80},
                                 {1, 2}, {3, 3}, {34, 5}, {9, 7}, {170, 3}, {2, 5}, {3, 5}, {6, 5}, {8, 5},
                                 {12, 5}, {16, 5}, {12, 10}, {2, 80}};
  for (const auto& cs : weighted)
    for (bool far : {false, true}) {
      check_loss(cs[0], cs[1], 1, false, lelp::kKL, 0.1f, far);
      check_loss(cs[0], cs[1], 1, true, lelp::kKL, 0.1f, far);
    }
  // the tile's resident form (the map fits sm_90's shared memory), then its streaming form; copies
  // landing at their wait, then at issue (a copy into a stage another thread still reads races)
  for (bool at_issue : {false, true})
    for (int64_t optin : {int64_t{232448}, int64_t{0}}) {
      lelp::emu::copies_land_at_issue = at_issue;
      lelp::emu::smem_optin_bytes = optin;
      for (int dtype : {lelp::kFloat32, lelp::kFloat16, lelp::kBFloat16}) {
        check_targets(3, 5, dtype, true);
        check_targets(2, 64, dtype, false);  // 8 fragments: every warp takes 4
      }
      check_targets(5, 40, lelp::kFloat32, true);  // J = 205: 13 fragments; 40 (row, class) pairs a warp
      // 3 tiles a block, 4 steps a tile resident (7 streaming), the last partial; then whole steps and
      // tiles (d, n multiples of 64: every chunk a copy, none zeroed)
      check_targets(3, 5, lelp::kBFloat16, true, 300, 200);
      check_targets(3, 5, lelp::kFloat32, true, 300, 200);  // fp32's split step across steps and tiles
      check_targets(3, 5, lelp::kBFloat16, true, 256, 128);
      // the streaming form's 128-row tiles at their widest (16 x 8 with the head: 144 columns, 5
      // fragments a warp in each row fragment), 3 tiles over the 2 blocks
      check_targets(16, 8, lelp::kBFloat16, true, 300, 64);
    }
  lelp::emu::copies_land_at_issue = false;
  check_targets(2, 256, lelp::kBFloat16, true);  // the row kernel
  std::printf("ok: ran %d of %d checks\n", ran, calls);
  return 0;
}
