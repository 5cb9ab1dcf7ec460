"""The CUDA kernels' bodies run on the host (tests/cuda_emu, see conftest.py) at every launch shape.

tests/test_ops_loss.py and tests/test_ops_targets.py run their reference cases on the "cuda_emu"
backend too; these add the shapes that pick each kernel variant: every (lanes per row, chunks per
lane) of the loss, and both sides of the targets tile's width limit, in both of its forms. ThreadSanitizer and
AddressSanitizer then run the same bodies to find shared-memory accesses that no barrier orders
and out-of-bounds accesses.
"""

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import build_emulation

from lelp_fast import reference
from lelp_fast.ops import _dispatch, distill_loss, lelp_targets
from lelp_fast.ops import loss as loss_op
from lelp_fast.ops import targets as targets_op

pytestmark = pytest.mark.skipif(not _dispatch.available("cpu", torch.device("cpu")), reason="needs the extension")
BF16 = 2  # csrc/include/lelp/row_math.h: enum DType


# (C, S) whose K = C * S take each of the 14 lane layouts (W, CH) of warp::loss_shape in chunks of 4,
# for every divergence (no S = 5 2^j below 32 chunks of 5: the KL with the hard-label term would take
# chunks of 5, CLASS_CHUNK_SHAPES).
LANE_LAYOUT_SHAPES = [(3, 1), (2, 4), (3, 4), (2, 8), (2, 12), (2, 16), (5, 8), (2, 32), (3, 30), (4, 25), (5, 32),
                      (2, 100), (2, 128), (3, 100), (5, 80)]


def test_lane_layout_shapes_cover_every_layout():
    cuda_cost = pytest.importorskip("cuda_cost")
    if shutil.which("g++") is None:
        pytest.skip("no g++")
    shapes = cuda_cost.shapes_of(sorted({c * s for c, s in LANE_LAYOUT_SHAPES}))
    layouts = {(1, 1), (1, 2), (1, 3), (1, 4)} | {(w, ch) for w in (2, 4, 8, 16, 32) for ch in (3, 4)}
    assert set(shapes.values()) == layouts
    # the KL with the hard-label term (test_loss_at_every_lane_layout) takes them too, in chunks of 4
    with_labels = cuda_cost.layouts_of([cuda_cost.Path(c, s, "fp32", True, False) for c, s in LANE_LAYOUT_SHAPES])
    assert {(w, ch) for w, ch, v in with_labels.values() if v == 4} == layouts


@pytest.mark.parametrize("backend", ["cuda_emu"])
@pytest.mark.parametrize("num_classes,s", LANE_LAYOUT_SHAPES)
@pytest.mark.parametrize("divergence", ["kl", "js", "mse"])
def test_loss_at_every_lane_layout(backend, num_classes, s, divergence):
    """K = 3 ... 400: every (W, CH) of warp::loss_shape (one lane a row with 1-4 chunks, 2 ... 32
    lanes with 3 or 4); odd K loads by element."""
    g = torch.Generator().manual_seed(num_classes * 1000 + s)
    n, k = 45, num_classes * s
    student = (torch.randn(n, k, generator=g) * 3).requires_grad_(True)
    log_t = torch.log_softmax(torch.randn(n, k, generator=g) * 3, dim=-1)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    labels[5] = -100
    kw = dict(num_classes=num_classes, n_subclasses=s, tau=2.0, alpha=0.1, divergence=divergence, reduction="none")
    loss = distill_loss(student, log_t, labels, backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss.sum(), student)
    s64 = student.detach().double().requires_grad_(True)
    want = reference.distillation_loss(s64, log_t.double(), labels, divergence_kind=divergence,
                                       **{key: v for key, v in kw.items() if key != "divergence"})
    (want_grad,) = torch.autograd.grad(want.sum(), s64)
    torch.testing.assert_close(loss.double(), want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(grad.double(), want_grad, atol=2e-5, rtol=1e-4)
    assert loss[5].item() == 0.0 and torch.equal(grad[5], torch.zeros(k))


# The dynamic shared memory a block may opt in to (CUDA C Programming Guide, compute capabilities).
SMEM_OPT_IN = {80: 166_912, 90: 232_448}


@pytest.fixture(params=["resident", "streaming"])
def tile_form(request, cuda_emulator):
    """The targets tile's form under emulation: resident (the emulated device has sm_90's shared
    memory, so every small test map fits) or streaming (a limit of 0)."""
    before = cuda_emulator.smem_optin_bytes()
    cuda_emulator.set_smem_optin_bytes(SMEM_OPT_IN[90] if request.param == "resident" else 0)
    yield request.param
    cuda_emulator.set_smem_optin_bytes(before)


@pytest.mark.parametrize("backend", ["cuda_emu"])
@pytest.mark.parametrize("num_classes,s,tile", [(2, 127, True), (2, 128, False), (16, 8, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_targets_tile_width_limit(backend, cuda_emulator, tile_form, num_classes, s, tile, dtype):
    """J = 256 is the widest map the tensor-core tile takes (bf16/fp16 with a split map, fp32 as split
    into bf16 too); J = 258 goes to the row kernel."""
    k = num_classes * s
    j = k + num_classes
    assert cuda_emulator.tile_takes(BF16, j, num_classes, s) == tile
    g = torch.Generator().manual_seed(k)
    n, d = 70, 48
    h = torch.randn(n, d, generator=g).to(dtype)
    weight, bias = torch.randn(d, j, generator=g) / d**0.5, torch.randn(j, generator=g)
    got = lelp_targets(h, weight, bias, num_classes, s, beta=0.5, tau=1.5, backend=backend)
    emb_bytes = 4 if dtype == torch.float32 else 2
    fits = cuda_emulator.resident_smem_bytes(emb_bytes, d, j, num_classes, s) <= cuda_emulator.smem_optin_bytes()
    assert cuda_emulator.last_targets_form() == ("rows" if not tile else "resident" if fits else "streaming")
    proj = h.double() @ weight.double() + bias.double()
    want = reference.log_targets(proj[:, :k], proj[:, k:], s, 0.5, 1.5)
    torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-4)


SANITIZERS = {
    # a missing __syncwarp/__syncthreads in any kernel body is a reported data race
    "thread": ["-fsanitize=thread"],
    # an out-of-bounds read or write of global or shared memory (compute-sanitizer memcheck's job)
    "address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"],
}


@pytest.fixture(scope="module")
def sanitizer_builds():
    """{sanitizer: the race check's binary, or why there is none}, both built side by side (cold, one
    after the other: 76 s for AddressSanitizer and 27 s for ThreadSanitizer with full debug information,
    2026-12-03; the line tables of -g1 are what a report's stack needs, and take 56 and 18 s)."""

    def build(sanitizer):
        flags = ["-O1", "-g1", *SANITIZERS[sanitizer]]
        try:
            binary = build_emulation("race_check.cpp", f"race_check_{sanitizer}", flags)
        except subprocess.CalledProcessError as exc:
            return f"no {sanitizer} sanitizer build here: {exc.stderr.decode()[-300:]}"
        return binary or "needs g++"

    with ThreadPoolExecutor(max_workers=len(SANITIZERS)) as pool:
        return dict(zip(SANITIZERS, pool.map(build, SANITIZERS)))


@pytest.mark.parametrize("sanitizer", sorted(SANITIZERS))
def test_kernel_bodies_under_sanitizers(sanitizer_builds, sanitizer):
    """tests/cuda_emu/race_check.cpp runs every kernel variant under ThreadSanitizer (removing one
    barrier makes it fail) and AddressSanitizer (an off-by-one store past a row makes it fail), its
    checks shared among one process a core (ThreadSanitizer alone took 58 s on 2 cores, 2026-12-03)."""
    binary = sanitizer_builds[sanitizer]
    if not os.path.isabs(binary):
        pytest.skip(binary)
    parts = max(2, min(4, os.cpu_count() or 1))  # 2 at least: the split itself is tested on every machine
    running = [subprocess.Popen([binary, str(part), str(parts)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for part in range(parts)]
    ran = []
    try:
        for process in running:
            stdout, stderr = process.communicate(timeout=300)
            assert "Sanitizer" not in stderr and "runtime error" not in stderr, stderr[-4000:]
            done = re.fullmatch(r"ok: ran (\d+) of (\d+) checks", stdout.strip())
            assert process.returncode == 0 and done, stdout + stderr[-2000:]
            ran.append((int(done.group(1)), int(done.group(2))))
    finally:
        for process in running:  # a failed part leaves none of the others running
            process.kill()
            process.wait()
    total = ran[0][1]
    assert total > 100 and all(n == total for _, n in ran) and sum(r for r, _ in ran) == total, ran


@pytest.mark.parametrize("backend", ["cuda_emu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("num_classes,s", [(5, 8), (8, 5)])
def test_cuda_loss_writes_the_folded_gradient_once(backend, monkeypatch, dtype, reduction, num_classes, s):
    """Issue 21 item 3: the CUDA kernel writes dloss/ds itself, in the student's dtype with the
    reduction's scale (a device tensor) folded in, as Triton does; fp16 and reduction="none" keep
    the fp32 gradient that the backward scales and casts. Was: fp32 always, then more N x K passes.
    In chunks of 4 (16-byte loads and stores) and of 5 (8 x 5 with the hard-label term: element by
    element; the layout is test_cuda_cost.py's test_class_wise_rows_of_5_subclasses_take_chunks_of_5)."""
    ext = _dispatch.extension()
    kernel, calls = ext.loss, []

    def loss(*args, **kwargs):
        calls.append(kwargs)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(ext, "loss", loss)
    g = torch.Generator().manual_seed(3)
    n = 37
    student = (torch.randn(n, num_classes * s, generator=g) * 4).to(dtype).requires_grad_(True)
    log_t = torch.log_softmax(torch.randn(n, num_classes * s, generator=g) * 3, dim=-1)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    labels[[0, 7]] = -100
    kw = dict(num_classes=num_classes, n_subclasses=s, tau=2.0, alpha=0.3, reduction=reduction)
    loss_value = distill_loss(student, log_t, labels, backend=backend, **kw)
    (3.0 * loss_value.sum()).backward()  # a loss scale: the folded gradient is scaled in place
    folded = reduction != "none" and dtype != torch.float16
    assert calls and calls[0].get("grad_dtype", 0) == (_dispatch.DTYPE_CODES[dtype] if folded else 0)
    assert (calls[0].get("grad_scale", 0) != 0) == folded
    s64 = student.detach().double().requires_grad_(True)
    want = reference.distillation_loss(s64, log_t.double(), labels, **kw)
    (3.0 * want.sum()).backward()
    assert student.grad.dtype == dtype
    atol, rtol = {torch.float32: (1e-6, 1e-4), torch.bfloat16: (1e-4, 1e-2), torch.float16: (1e-5, 2e-3)}[dtype]
    torch.testing.assert_close(loss_value.double(), want, atol=atol * 100, rtol=rtol)
    torch.testing.assert_close(student.grad.double(), s64.grad, atol=atol, rtol=rtol)
    assert torch.equal(student.grad[[0, 7]], torch.zeros(2, num_classes * s, dtype=dtype))


def test_cuda_tile_rule_and_split_layout_match_the_kernel(cuda_emulator):
    """ops/targets.py's copy of the tile's width rule and split-map padding is the C++'s."""
    for j, c, s in [(16, 2, 8), (18, 2, 8), (240, 16, 15), (256, 2, 127), (258, 2, 128), (205, 5, 40), (300, 3, 100)]:
        for emb_dtype in (0, 1, 2):
            assert cuda_emulator.tile_takes(emb_dtype, j, c, s) == targets_op.cuda_tile_takes(j, c, s), (j, c, s)
    for d, j in [(1, 1), (31, 17), (32, 16), (33, 256), (768, 205)]:
        rows, cols = cuda_emulator.split_layout(d, j)
        hi, lo = targets_op.cuda_tile_split(torch.randn(d, j), torch.bfloat16, torch.device("cpu"))
        assert hi.shape == lo.shape == (rows, cols), (d, j)


def test_cuda_targets_tile_fits_shared_memory(cuda_emulator):
    """Every map the tile takes (J up to 256 padded columns; embeddings of 2 bytes, or 4 in fp32)
    fits the smallest opt-in limit: two stages of 64 x 32 embeddings (128 x 32 in 16 bits up to 160
    columns) and 32 x (J + 8) of each map part (bf16 for fp32 embeddings, as for bf16), fp32's step
    split into bf16 hi and lo, or the projections over them (launch_tile sets the opt-in)."""
    for emb_bytes in (2, 4):
        for j, c, s in [(256, 2, 128), (256, 16, 15), (241, 1, 240), (16, 2, 8)]:
            if targets_op.cuda_tile_takes(j, c, s):
                assert cuda_emulator.tile_smem_bytes(emb_bytes, j, c, s) <= min(SMEM_OPT_IN.values()), (j, c, s)
    # the widest, fp32: 96 KB (152 KB when the map's parts were TF32 in fp32)
    assert cuda_emulator.tile_smem_bytes(4, 256, 2, 128) == 2 * (4 * 64 * 40 + 2 * 2 * 32 * 264) + 2 * 2 * 64 * 40


@pytest.mark.parametrize("backend", ["cuda_emu"])
def test_cuda_targets_split_the_map_once_per_weight(backend, monkeypatch):
    """Issue 21 items 7, 10: the tile read the fp32 map and split it into hi + lo on every step of
    every tile; now the split is made once per weight (and dtype, device) and kept until the weight
    changes (in place: its version; a refit: a new tensor)."""
    made = []
    split = targets_op.cuda_tile_split
    monkeypatch.setattr(targets_op, "cuda_tile_split", lambda *args: made.append(args[1]) or split(*args))
    g = torch.Generator().manual_seed(5)
    n, d, num_classes, s = 70, 40, 3, 4
    h = torch.randn(n, d, generator=g)
    weight, bias = torch.randn(d, num_classes * s + num_classes, generator=g) / d**0.5, torch.randn(15, generator=g)

    def check(emb):
        got = lelp_targets(emb, weight, bias, num_classes, s, beta=0.5, backend=backend)
        proj = emb.double() @ weight.double() + bias.double()
        want = reference.log_targets(proj[:, :12], proj[:, 12:], s, 0.5, 1.0)
        torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-4)

    check(h)
    check(h)
    assert made == [torch.float32]
    check(h.bfloat16())
    assert made == [torch.float32, torch.bfloat16]
    with torch.no_grad():
        weight.mul_(-1.5)  # in place: the version counter moves
    check(h)
    assert made == [torch.float32, torch.bfloat16, torch.float32]


def test_cuda_targets_resident_form_at_the_cost_shapes(cuda_emulator):
    """Issue 21 item 4 (CUDA): the streaming tile read the whole split map from L2 once per 64 rows
    (1,536 B a row at K = 16 with the head, d = 768, bf16: 1.96x the floor by the map alone). The
    resident form copies it into shared memory once per block: the map (768 rows of 32 + 8 columns,
    hi and lo), 4 stages of 128 x (64 + 8) embeddings (128-row tiles at 16 or 32 columns in 16 bits)
    and the projections fit sm_90's opt-in limit in bf16/fp16 at K = 16 with the head (not sm_80's:
    there it streams), and sm_80's with given logits (16 columns); fp32 with given logits (64-row
    tiles) fits sm_90, and with the head since its map is bf16 hi + lo (2 bytes an entry: as TF32
    hi + lo, 4, it did not fit and streamed), its stages fp32 and one step split into bf16 hi + lo;
    K = 128's map does not, and streams."""
    k16 = (768, 20, 4, 4)  # d, J, C, S
    assert cuda_emulator.resident_smem_bytes(2, *k16) == 2 * (2 * 768 * 40 + 4 * 128 * 72) + 4 * 128 * 33
    assert SMEM_OPT_IN[80] < cuda_emulator.resident_smem_bytes(2, *k16) <= SMEM_OPT_IN[90]
    assert cuda_emulator.resident_smem_bytes(2, 768, 16, 4, 4) <= SMEM_OPT_IN[80]
    fp32_logits = 2 * 2 * 768 * 24 + 4 * 4 * 64 * 72 + 2 * 2 * 64 * 72 + 4 * 64 * 25
    assert cuda_emulator.resident_smem_bytes(4, 768, 16, 4, 4) == fp32_logits
    assert SMEM_OPT_IN[80] < fp32_logits <= SMEM_OPT_IN[90]
    fp32_head = 2 * 2 * 768 * 40 + 4 * 4 * 64 * 72 + 2 * 2 * 64 * 72 + 4 * 64 * 33
    assert cuda_emulator.resident_smem_bytes(4, *k16) == fp32_head
    assert SMEM_OPT_IN[80] < fp32_head <= SMEM_OPT_IN[90]
    assert cuda_emulator.resident_smem_bytes(2, 768, 144, 16, 8) > SMEM_OPT_IN[90]


@pytest.mark.parametrize("backend", ["cuda_emu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,d", [(300, 200), (330, 70), (129, 33)])
@pytest.mark.parametrize("num_classes,s,with_head", [(3, 5, True), (4, 4, False), (7, 9, True)])
def test_cuda_targets_tile_over_several_tiles(backend, cuda_emulator, tile_form, dtype, n, d, num_classes, s,
                                              with_head):
    """The emulated grid of 2 blocks takes 2-3 tiles each: the resident form's pipeline of 4 stages
    of 64 columns runs across tiles (d = 70, 33: 2 and 1 steps a tile, so the next tile's steps are
    in flight during an epilogue; d = 200: 4 steps, the stages wrap within a tile), its last step
    partial (zero map rows past split_rows(d) at d = 70, 200), and a block's last tile is partial
    (n = 129, 330). The resident form's instantiations: 32 padded columns (3 x 5 with the head), 16
    (4 x 4 with given logits: the second column set of warps holds no fragment) and any (7 x 9 with
    the head, 80 columns)."""
    got, want = _targets_and_reference(backend, dtype, num_classes, s, with_head, d, n, n + d)
    emb_bytes = 4 if dtype == torch.float32 else 2
    j = num_classes * s + (num_classes if with_head else 0)
    fits = cuda_emulator.resident_smem_bytes(emb_bytes, d, j, num_classes, s) <= cuda_emulator.smem_optin_bytes()
    assert cuda_emulator.last_targets_form() == ("resident" if fits else "streaming")
    assert fits or tile_form == "streaming"
    torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-4)


def _targets_and_reference(backend, dtype, num_classes, s, with_head, d, n, seed):
    """lelp_targets of random embeddings and map (with the head's columns, or given logits) on
    ``backend``, and the fp64 reference's (β = 0.5, τ = 1.5)."""
    g = torch.Generator().manual_seed(seed)
    k = num_classes * s
    j = k + (num_classes if with_head else 0)
    h = torch.randn(n, d, generator=g).to(dtype)
    weight, bias = torch.randn(d, j, generator=g) / d**0.5, torch.randn(j, generator=g)
    z = None if with_head else torch.randn(n, num_classes, generator=g).to(dtype)
    got = lelp_targets(h, weight, bias, num_classes, s, teacher_logits=z, beta=0.5, tau=1.5, backend=backend)
    proj = h.double() @ weight.double() + bias.double()
    return got, reference.log_targets(proj[:, :k], proj[:, k:] if with_head else z.double(), s, 0.5, 1.5)


# (C, S, head, d, n, rows): maps of 16 to 160 padded columns take the streaming tile's 128-row form
# (every fragment of both column sets at 10 x 15 with the head, 160; 144 the cost shape's 16 x 8;
# given logits where K + C passes the map's width, 20 x 8: projections of 184 columns), past 160
# (11 x 15 with the head, 176) and with 16-byte rows only: d = 104 (208 B rows in 16 bits, 416 in
# fp32) pairs, d = 101 (202 B, 404 B: copied by element) does not; nor 80 x 2 with given logits (240
# columns of projections: two 128-row blocks would not fit an SM). n = 333: 3 tiles of 128 (the last
# partial) over the 2 emulated blocks; 1, 128 and 129 rows at 16 x 8.
PAIRED_CASES = [(16, 8, True, 104, 333, 128), (10, 15, True, 104, 333, 128), (3, 5, False, 104, 333, 128),
                (20, 8, False, 104, 333, 128), (11, 15, True, 104, 333, 64), (16, 8, True, 101, 333, 64),
                (80, 2, False, 104, 333, 64), (16, 8, True, 104, 1, 128), (16, 8, True, 104, 128, 128),
                (16, 8, False, 104, 129, 128),
                # the 128-row tile's narrower instantiations (tile::paired_frags 2, 3 and 4), each with a
                # fragment past the map's width (3, 5 and 7 of 16 columns), computed and not stored
                (4, 8, True, 104, 200, 128), (8, 8, True, 104, 333, 128), (14, 8, False, 104, 333, 128)]


def _streaming_targets(cuda_emulator, backend, dtype, num_classes, s, with_head, d, n, seed):
    """lelp_targets through the emulated streaming tile (a shared-memory opt-in of 0), its reference
    and the emulated tile's rows."""
    before = cuda_emulator.smem_optin_bytes()
    cuda_emulator.set_smem_optin_bytes(0)  # the streaming tile for every map
    try:
        got, want = _targets_and_reference(backend, dtype, num_classes, s, with_head, d, n, seed)
        assert cuda_emulator.last_targets_form() == "streaming"
        return got, want, cuda_emulator.last_tile_rows()
    finally:
        cuda_emulator.set_smem_optin_bytes(before)


@pytest.mark.parametrize("backend", ["cuda_emu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("num_classes,s,with_head,d,n,rows", PAIRED_CASES)
def test_cuda_streaming_tile_pairs_row_fragments(backend, cuda_emulator, dtype, num_classes, s, with_head, d, n,
                                                 rows):
    """Issue 21 item 10 (CUDA, K = 128): the streaming tile took 64 rows a block and streamed the whole
    split map once per 64 rows (6,912 B a row at K = 128 with the head, d = 768, bf16). For embeddings
    in 16-byte rows (bf16, fp16 and fp32) and maps of up to 160 padded columns each warp now takes two
    row fragments, so a block's tile is 128 rows and a step's map serves twice the rows. The rows are
    the instantiation the emulator ran."""
    got, want, tile_rows = _streaming_targets(cuda_emulator, backend, dtype, num_classes, s, with_head, d, n,
                                              num_classes * s + d + n)
    assert tile_rows == rows
    torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["cuda_emu"])
def test_cuda_streaming_tile_keeps_64_rows_where_two_128_row_blocks_do_not_fit(backend, cuda_emulator):
    """On an SM of 100 KB of shared memory (sm_86/89) two blocks of the 128-row form at 16 x 8 with the
    head (74,240 B each) do not fit, where two of the 64-row form (49,152 B) do: it keeps 64 rows."""
    before = cuda_emulator.smem_per_sm_bytes()
    cuda_emulator.set_smem_per_sm_bytes(100 * 1024)
    try:
        got, want, tile_rows = _streaming_targets(cuda_emulator, backend, torch.bfloat16, 16, 8, True, 104, 200, 3)
    finally:
        cuda_emulator.set_smem_per_sm_bytes(before)
    assert tile_rows == 64
    torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["cuda_emu"])
@pytest.mark.parametrize("num_classes,s,with_head", [(2, 8, False), (4, 8, True), (8, 8, True)])
def test_cuda_streaming_tile_of_a_small_map_keeps_128_rows_on_a_100_kb_sm(backend, cuda_emulator, num_classes, s,
                                                                        with_head):
    """The 128-row tile's map stage is as wide as its instantiation's fragments (tile::paired_ld_w):
    at one width for all (168, session 60's first form) a small map's block took 63,488 B and two no
    longer fit an SM of 100 KB (sm_86/89), which then fell to 64-row tiles (a review's finding)."""
    before = cuda_emulator.smem_per_sm_bytes()
    cuda_emulator.set_smem_per_sm_bytes(100 * 1024)
    try:
        got, want, tile_rows = _streaming_targets(cuda_emulator, backend, torch.bfloat16, num_classes, s, with_head,
                                                  104, 200, 5)
    finally:
        cuda_emulator.set_smem_per_sm_bytes(before)
    assert tile_rows == 128
    torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-4)


def test_cuda_streaming_tile_of_128_rows_fits_two_blocks_an_sm(cuda_emulator):
    """The 128-row form's shared memory: at its widest map with the head (160 columns, 16-bit) the
    projections (128 rows of 160 + 1 floats) over two stages of 128 x 40 embeddings and 32 x 168 of
    each map part (the 128-row form's map stage is 32 kFrags + 8 wide, 168 at 9 or 10 fragments:
    tile::paired_ld_w); two blocks fit an SM on sm_80 and sm_90 (228 KB on sm_90, 164 KB on sm_80,
    1 KB a block reserved). Given logits can widen the projections past the map (K + C columns): 20 x 8
    (184) pairs on sm_90, not on sm_80; 80 x 2 (240) on neither, and would need 123,392 B (over a
    99 KB card's opt-in). Rows copied by element keep the 64-row form, whose two stages outweigh its
    projections."""
    sm80, sm90 = 164 * 1024, 228 * 1024
    paired = cuda_emulator.tile_smem_bytes(2, 160, 10, 15)
    assert paired == 4 * 128 * 161 > 2 * (128 * 40 * 2 + 2 * 2 * 32 * 168)
    assert 2 * (paired + 1024) <= sm80 and cuda_emulator.tile_smem_bytes(2, 160, 10, 15, smem_per_sm=sm80) == paired
    assert cuda_emulator.tile_smem_bytes(2, 160, 10, 15, vec=False) == 2 * (64 * 40 * 2 + 2 * 2 * 32 * 168)
    assert cuda_emulator.tile_smem_bytes(2, 160, 20, 8) == 4 * 128 * 185  # given logits: K + C = 180 -> 184
    assert cuda_emulator.tile_smem_bytes(2, 160, 20, 8, smem_per_sm=sm80) == 2 * (64 * 40 * 2 + 2 * 2 * 32 * 168)
    assert cuda_emulator.tile_smem_bytes(2, 160, 80, 2, smem_per_sm=sm90) == 4 * 64 * 241
    # fp32 (4-byte embeddings, each step split into bf16 hi + lo): its stages outweigh the projections;
    # two 128-row blocks fit sm_90, not sm_80 (64 rows there)
    fp32_paired = 2 * (128 * 40 * 4 + 2 * 2 * 32 * 168) + 2 * 2 * 128 * 40  # the 128-row form's map: 168 a row
    assert cuda_emulator.tile_smem_bytes(4, 144, 16, 8) == fp32_paired == 104_448
    fp32_64_rows = 2 * (64 * 40 * 4 + 2 * 2 * 32 * 152) + 2 * 2 * 64 * 40
    assert cuda_emulator.tile_smem_bytes(4, 144, 16, 8, smem_per_sm=sm80) == fp32_64_rows
    for c, s, head in [(16, 8, True), (10, 15, True), (20, 8, False), (80, 2, False), (4, 4, True)]:
        j = c * s + (c if head else 0)
        for smem_per_sm in (sm80, sm90):
            assert 2 * (cuda_emulator.tile_smem_bytes(2, j, c, s, smem_per_sm=smem_per_sm) + 1024) <= smem_per_sm


@pytest.mark.parametrize("backend", ["cuda_emu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_targets_tile_edges(backend, cuda_emulator, tile_form, dtype):
    """One row; d of 13 (rows not 16-byte aligned: the copies go element by element; one partial
    step) and 70 (three steps: the double buffer wraps); a small beta; a NaN row stays NaN
    (check_inputs off) and leaves its neighbours alone. (Huge logits: test_ops_targets.py.)"""
    g = torch.Generator().manual_seed(11)
    num_classes, s = 4, 6
    for n, d in [(1, 13), (66, 70)]:
        h = torch.randn(n, d, generator=g).to(dtype)
        weight = torch.randn(d, num_classes * s + num_classes, generator=g) / d**0.5
        bias = torch.randn(num_classes * s + num_classes, generator=g)
        got = lelp_targets(h, weight, bias, num_classes, s, beta=0.05, tau=0.5, backend=backend)
        assert cuda_emulator.last_targets_form() == tile_form
        proj = h.double() @ weight.double() + bias.double()
        want = reference.log_targets(proj[:, :24], proj[:, 24:], s, 0.05, 0.5)
        # the split map (bf16/fp16 hi + lo: 2^-16 of |w|; fp32 h as bf16 hi + lo too) amplified by 1/beta
        torch.testing.assert_close(got.double(), want, atol=2e-3, rtol=1e-3)
    h[5] = float("nan")
    got = lelp_targets(h, weight, bias, num_classes, s, beta=0.05, tau=0.5, backend=backend, check_inputs=False)
    assert torch.isnan(got[5]).all() and torch.isfinite(got[[4, 6]]).all()


# (C, S) of S = 5 2^j that take each layout in chunks of 5 (W, CH: warp::loss_layout), classes of 1-32
# chunks (in one slot, in a run of lanes, or in 2 or 4 slots of every lane: 2 x 80, 1 x 20, 1 x 160),
# padded chunks (1 x 5, 3 x 5, 7 x 5, 9 x 5, 5 x 10), and one past the 32 chunks (34 x 5: chunks of 4,
# the class sums through shared memory).
CLASS_CHUNK_SHAPES = [(1, 5), (2, 5), (3, 5), (4, 5), (2, 10), (1, 20), (6, 5), (3, 10), (7, 5), (8, 5), (4, 10),
                      (2, 20), (9, 5), (5, 10), (12, 5), (16, 5), (4, 20), (12, 10), (8, 20), (4, 40), (2, 80),
                      (1, 160), (34, 5)]


def test_class_chunk_shapes_cover_every_layout():
    cuda_cost = pytest.importorskip("cuda_cost")
    if shutil.which("g++") is None:
        pytest.skip("no g++")
    paths = [cuda_cost.Path(c, s, "fp32", True, True) for c, s in CLASS_CHUNK_SHAPES]
    layouts = cuda_cost.layouts_of(paths)
    fives = {(1, 2), (1, 4)} | {(w, ch) for w in (2, 4, 8) for ch in (3, 4)}
    assert {(w, ch) for w, ch, v in layouts.values() if v == 5} == fives
    assert layouts[paths[-1]][2] == 4  # K = 170: more than 32 chunks of 5


@pytest.mark.parametrize("backend", ["cuda_emu"])
@pytest.mark.parametrize("num_classes,s", [(3, 8), (2, 12), (2, 32), (5, 16), (3, 64), (16, 8), (16, 32),
                                           (8, 64), (4, 128), (4, 64), (4, 32), (8, 32), (7, 32), (1, 2), (7, 2),
                                           (5, 3), (31, 3), (9, 7), (11, 13)] + CLASS_CHUNK_SHAPES)
@pytest.mark.parametrize("far", [False, True])
def test_subclass_weighted_loss_at_each_class_layout(backend, num_classes, s, far):
    """λ ≠ 1: classes as whole 16-byte chunks summed in registers (S = 8, 16, 32, 64, 128: a class in
    one slot of 2-32 lanes, reduce-scattered over runs of 8-32 lanes of 4 chunks on 8, 16 and 32
    lanes: 4 x 32, 8 x 32, 7 x 32 (a run past K), 16 x 32, 4 x 64, 8 x 64, 4 x 128; or in 2-4 slots
    of every lane), S = 5 2^j as whole chunks of 5 (CLASS_CHUNK_SHAPES: a class in one slot, in a
    run of 2-8 lanes, or in 2 or 4 slots of every lane; padded chunks),
    other S through shared memory (S = 2, 3, 7, 12, 13, and 5 at 34 x 5; K = 14, 15, 63, 93, 143
    not a multiple of 4, C = 1);
    far: class 1 some 200 below the row's max (its share of q underflows), so the warp sums every
    class exactly. With the hard-label term at τ = 2."""
    g = torch.Generator().manual_seed(num_classes * 100 + s)
    n, k = 37, num_classes * s
    student = torch.randn(n, k, generator=g, dtype=torch.float64) * 3
    if far:
        student[::3, (s if num_classes > 1 else 0):2 * s] -= 200.0
    log_t = torch.log_softmax(torch.randn(n, k, generator=g, dtype=torch.float64) * 2, -1).float()
    labels = torch.randint(0, num_classes, (n,), generator=g)
    x = student.float().requires_grad_(True)
    loss = distill_loss(x, log_t, labels, num_classes=num_classes, n_subclasses=s, tau=2.0, alpha=0.2,
                        subclass_weight=0.1, backend=backend, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), x)
    ref = x.detach().double().requires_grad_(True)
    want = (reference.subclass_weighted_kl(ref, log_t.double(), num_classes, s, 2.0, 0.1)
            + 0.2 * reference.hard_label_rows(ref, labels, num_classes, s))
    (want_grad,) = torch.autograd.grad(want.sum(), ref)
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss.double(), want.detach(), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(grad.double(), want_grad, atol=2e-5, rtol=1e-4)


# λ ≠ 1 with 16-bit students: one shape per chunk-of-5 layout (1 x 2, 1 x 4, 2 x 3, 2 x 4, 4 x 3,
# 4 x 4, 8 x 3, 8 x 4; padded chunks at 3 x 5, 7 x 5, 9 x 5), chunks of 4 summed in registers
# (16 x 8, 4 x 32, 8 x 64) and through shared memory (2 x 12, 34 x 5).
SIXTEEN_BIT_CLASS_SHAPES = [(1, 5), (3, 5), (6, 5), (7, 5), (9, 5), (16, 5), (12, 10), (2, 80), (16, 8), (4, 32),
                            (8, 64), (2, 12), (34, 5)]


def test_sixteen_bit_class_shapes_cover_every_chunk_of_5_layout():
    cuda_cost = pytest.importorskip("cuda_cost")
    if shutil.which("g++") is None:
        pytest.skip("no g++")
    paths = [cuda_cost.Path(c, s, "bf16", True, True) for c, s in SIXTEEN_BIT_CLASS_SHAPES]
    fives = {(1, 2), (1, 4)} | {(w, ch) for w in (2, 4, 8) for ch in (3, 4)}
    assert {(w, ch) for w, ch, v in cuda_cost.layouts_of(paths).values() if v == 5} == fives


@pytest.mark.parametrize("backend", ["cuda_emu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("num_classes,s", SIXTEEN_BIT_CLASS_SHAPES)
def test_subclass_weighted_loss_in_16_bits(backend, dtype, reduction, num_classes, s):
    """λ ≠ 1 (the default loss) on bf16 and fp16 students, as the cost gate's paths run it: 16-bit
    loads, element by element in chunks of 5, and (bf16, mean) the gradient written once in the
    student's dtype with the mean folded in. Against the fp64 formula on the same 16-bit values."""
    g = torch.Generator().manual_seed(num_classes * 100 + s)
    n, k = 37, num_classes * s
    student = (torch.randn(n, k, generator=g) * 3).to(dtype)
    student[::4, :s] -= 200.0  # a class far below its row: its share underflows (the exact sums' fallback)
    x = student.requires_grad_(True)
    log_t = torch.log_softmax(torch.randn(n, k, generator=g, dtype=torch.float64) * 2, -1).float()
    labels = torch.randint(0, num_classes, (n,), generator=g)
    labels[3] = -100
    assert loss_op._kernel_weights_subclasses("cuda", num_classes, s)  # λ in the kernel's one pass
    loss = distill_loss(x, log_t, labels, num_classes=num_classes, n_subclasses=s, tau=2.0, alpha=0.2,
                        subclass_weight=0.1, backend=backend, reduction=reduction)
    (grad,) = torch.autograd.grad(3.0 * loss.sum(), x)
    ref = x.detach().double().requires_grad_(True)
    keep = labels != -100
    per_row = (reference.subclass_weighted_kl(ref, log_t.double(), num_classes, s, 2.0, 0.1)
               + 0.2 * reference.hard_label_rows(ref, labels, num_classes, s))
    want = reference.reduce_rows(torch.where(keep, per_row, torch.zeros_like(per_row)), labels, -100, reduction)
    (want_grad,) = torch.autograd.grad(3.0 * want.sum(), ref)
    assert grad.dtype == dtype and torch.isfinite(loss).all()
    torch.testing.assert_close(loss.double(), want.detach(), atol=2e-5, rtol=1e-4)
    # the gradient rounded to the student's dtype (half an ulp: 2^-8 bf16, 2^-11 fp16) once, or
    # twice where the kernel writes it in bf16 and the backward scales it in place (the 3.0 above),
    # plus the fp32 kernel's own error near a rounding midpoint; fp16's subnormals (below 2^-14, the
    # far class's gradients) are spaced 2^-24 apart
    roundings = 2 if dtype == torch.bfloat16 and reduction == "mean" else 1
    rtol = roundings * (2 ** -8 if dtype == torch.bfloat16 else 2 ** -11) + 1e-4
    atol = 1e-6 * want_grad.abs().max().item() + (2 ** -25 if dtype == torch.float16 else 0.0)
    torch.testing.assert_close(grad.double(), want_grad, atol=atol, rtol=rtol)
    assert torch.equal(grad[3], torch.zeros(k, dtype=dtype))


@pytest.mark.parametrize("backend", ["cuda_emu"])
@pytest.mark.parametrize("num_classes,s", [(4, 8), (3, 5), (4, 25), (2, 12)])
def test_subclass_weighted_row_does_not_depend_on_its_warp(backend, num_classes, s):
    """λ ≠ 1: a class whose student logits and targets are all -inf has q = p = 0 and a zero gradient,
    also when another row of the warp has a class far below its max, so that the warp sums every
    class from its own max (the fallback took that class's max as -inf and gave NaN gradients)."""
    g = torch.Generator().manual_seed(s)
    k = num_classes * s
    student = torch.randn(2, k, generator=g) * 3
    log_t = torch.randn(2, k, generator=g)
    student[0, :s] = float("-inf")
    log_t[0, :s] = float("-inf")
    log_t = torch.log_softmax(log_t, -1)
    student[1, s:2 * s] -= 200.0
    kw = dict(num_classes=num_classes, n_subclasses=s, tau=2.0, subclass_weight=0.1, reduction="none",
              check_inputs=False)
    grads = []
    for rows in (slice(0, 1), slice(0, 2)):  # row 0 alone, then beside row 1
        x = student[rows].clone().requires_grad_(True)
        loss = distill_loss(x, log_t[rows], backend=backend, **kw)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        grads.append(grad[0])
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
