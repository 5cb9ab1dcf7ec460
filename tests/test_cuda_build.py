"""The CUDA sources compiled for sm_80 and sm_90 with ``-Xptxas -v``: what the resource report says.

Runs wherever nvcc is (no GPU needed). Spills and per-thread stack frames are refused; the SASS
(nvdisasm, bundled with Triton) must show what the kernels are built for: tensor-core MMA in the
targets tile, shuffle reductions and 16-byte loads in the loss, no local-memory traffic. The
kernels' numerics are tested on the host by tests/test_ops_*.py's "cuda_emu" backend.
"""

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ["csrc/cuda/loss.cu", "csrc/cuda/targets.cu"]
ARCHS = [80, 90]
NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not installed")


def compile_cubin(source: str, arch: int, cubin) -> str:
    """nvcc -cubin with -Xptxas -v; returns the resource report."""
    cmd = [NVCC, f"-arch=sm_{arch}", "-std=c++17", "-O3", "-Xptxas", "-v", "-I", os.path.join(ROOT, "csrc/include"),
           "-I", os.path.join(ROOT, "csrc"), "-cubin", os.path.join(ROOT, source), "-o", str(cubin)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return out.stdout + out.stderr


def parse_report(text: str) -> dict:
    """{kernel: {"stack": bytes, "spill_stores": bytes, "spill_loads": bytes, "registers": n}}."""
    report, kernel = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            kernel = m.group(1)
            report[kernel] = {}
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and kernel:
            report[kernel].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and kernel:
            report[kernel]["registers"] = int(m.group(1))
    return report


def side_by_side(fn, items) -> list:
    """[fn(item) for item in items], one at a time a core (nvcc and nvdisasm are single-threaded)."""
    with ThreadPoolExecutor(max_workers=max(1, min(len(items), os.cpu_count() or 1))) as pool:
        return list(pool.map(fn, items))


@pytest.fixture(scope="module")
def cubins(tmp_path_factory):
    """{(source, arch): (cubin path, ptxas report)}, each source compiled once per architecture, the
    compiles side by side (one nvcc a core: 150 s of the suite one after another on 2 cores, 2026-12-03)."""
    tmp = tmp_path_factory.mktemp("nvcc")
    keys = [(src, arch) for src in SOURCES for arch in ARCHS]
    paths = {(src, arch): tmp / f"{os.path.basename(src)}.{arch}.cubin" for src, arch in keys}
    reports = side_by_side(lambda key: compile_cubin(*key, paths[key]), keys)
    return {key: (paths[key], parse_report(text)) for key, text in zip(keys, reports)}


@pytest.fixture(scope="module")
def reports(cubins):
    return {key: report for key, (_, report) in cubins.items()}


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_kernels_compile_without_spills(reports, source, arch):
    report = reports[(source, arch)]
    assert report, f"no kernel found in the ptxas report of {source}"
    for kernel, facts in report.items():
        assert facts["spill_stores"] == 0 and facts["spill_loads"] == 0, f"{kernel}: {facts}"


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_kernels_use_no_local_stack(reports, source, arch):
    """The warp and tile kernels keep rows in registers and shared memory (the one-thread-per-row
    baselines they replaced had 8-16 KB per-thread stack frames)."""
    for kernel, facts in reports[(source, arch)].items():
        assert facts["stack"] == 0, f"{kernel}: {facts}"


def nvdisasm():
    """Triton's bundled nvdisasm (the SASS of a cubin, no GPU needed), else one on PATH."""
    try:
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
        if os.path.exists(bundled):
            return bundled
    except ImportError:
        pass
    return shutil.which("nvdisasm")


@pytest.fixture(scope="module")
def sass(cubins):
    """{(source, arch): {kernel name: SASS text}} from nvdisasm."""
    tool = nvdisasm()
    if tool is None:
        pytest.skip("no nvdisasm (it comes with Triton)")

    def listing(cubin) -> dict:
        text = subprocess.run([tool, "-c", str(cubin)], check=True, capture_output=True, text=True).stdout
        kernels, name = {}, None
        for line in text.splitlines():
            m = re.match(r"\s*\.text\.(\S+):", line)
            if m:
                name = m.group(1)
                kernels[name] = []
            elif name:
                kernels[name].append(line)
        return {k: "\n".join(v) for k, v in kernels.items()}

    return dict(zip(cubins, side_by_side(listing, [cubin for cubin, _ in cubins.values()])))


def kernels_named(listing: dict, part: str) -> dict:
    found = {k: v for k, v in listing.items() if part in k}
    assert found, f"no kernel named *{part}* in {sorted(listing)}"
    return found


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("form", ["targets_tile_kernel", "targets_resident_kernel"])
def test_targets_tile_runs_on_tensor_cores(sass, arch, form):
    """The tile kernels (streaming and resident) multiply with HMMA (WMMA lowers to mma.sync on sm_80
    and sm_90): bf16 and fp16 16x8x16, fp32 as bf16 16x8x16 too (its embeddings split into bf16 hi +
    lo in shared memory; TF32 16x8x4 before); each stages its embeddings and the split map with
    asynchronous 16-byte copies (cp.async.cg: LDGSTS.E.BYPASS.128; issue 21 item 10: the loads were
    synchronous)."""
    tiles = kernels_named(sass[("csrc/cuda/targets.cu", arch)], form)
    want = {"HalfMmaI13__nv_bfloat16": r"HMMA\.16816\.F32\.BF16", "HalfMmaI6__half": r"HMMA\.16816\.F32\b",
            "SplitFloatMma": r"HMMA\.16816\.F32\.BF16"}
    # with 16-byte rows (kVec) and without; the resident form also at 16, 32 and any padded columns; the
    # streaming form with 16-byte rows also in 128-row tiles (2 row fragments a warp), one for each
    # count of fragments a warp takes there (tile::paired_frags, 1 to 5)
    per_dtype = 7 if form == "targets_tile_kernel" else 6
    assert len(tiles) == per_dtype * len(want)
    for part, mma in want.items():
        found = [(n, c) for n, c in tiles.items() if part in n]
        assert len(found) == per_dtype, part
        for name, code in found:
            assert re.search(mma, code), f"{name}: no {mma}"
            assert "LDGSTS.E.BYPASS.128" in code, f"{name}: no asynchronous 16-byte copies"


@pytest.mark.parametrize("arch", ARCHS)
def test_targets_tile_loads_fragments_from_shared_memory_with_ldmatrix(sass, arch):
    """Every tile kernel loads its WMMA fragments with LDSM (ldmatrix), one instruction a fragment.
    nvcc 13's bf16 load_matrix_sync (bf16 and fp32 embeddings: their fragments are bf16) took a
    generic address: 4 LD.E a fragment, and 4 MOVM more for a row-major B; the kernels now emit the
    same PTX wmma.load with the .shared state space for A (csrc/cuda/targets.cu: load_bf16_a_shared)
    and, since session 54, the ldmatrix ptxas made of it for B (load_bf16_b_ldmatrix), as fp16's
    inferred address space already did."""
    listing = sass[("csrc/cuda/targets.cu", arch)]
    tiles = {**kernels_named(listing, "targets_tile_kernel"), **kernels_named(listing, "targets_resident_kernel")}
    for name, code in tiles.items():
        assert "LDSM.16.M88.4" in code and "LDSM.16.MT88.4" in code, f"{name}: no ldmatrix fragment loads"
        assert not re.search(r"\b(LD\.E|MOVM)\b", code), f"{name}: generic fragment loads"


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_reduces_with_shuffles_and_loads_16_bytes(sass, arch):
    """Every loss kernel reduces with warp shuffles; the row kernels in chunks of 4 load fp32 rows 16
    bytes at a time and store the gradient 16 (fp32) or 8 (bf16/fp16) bytes at a time (those in
    chunks of 5, element by element)."""
    kernels = kernels_named(sass[("csrc/cuda/loss.cu", arch)], "loss_kernel")
    # chunks of 4: W = 1 with 1-4 chunks, W = 2 ... 32 with 3 or 4 (warp::loss_shape); chunks of 5:
    # W = 1 with 2 or 4, W = 2, 4, 8 with 3 or 4 (warp::loss_layout)
    fours = {name: code for name, code in kernels.items() if re.search(r"loss_kernelILi\d+ELi\d+ELi4E", name)}
    assert len(fours) == 14 and len(kernels) == 14 + 8
    for name, code in kernels.items():
        if "loss_kernelILi1E" not in name:  # W = 1: one lane per row, nothing to shuffle
            assert "SHFL.BFLY" in code, f"{name}: no shuffle reduction"
    for name, code in fours.items():
        assert "LDG.E.128" in code and "STG.E.128" in code, f"{name}: no 16-byte loads/stores"
        # bf16/fp16 students: the folded gradient in their dtype, 4 elements a store (issue 21 item 3)
        assert "STG.E.64" in code, f"{name}: no 8-byte gradient stores"


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("arch", ARCHS)
def test_no_local_memory_traffic_in_sass(sass, source, arch):
    for name, code in sass[(source, arch)].items():
        assert not re.search(r"\b(LDL|STL)\b", code), f"{name}: local-memory loads/stores"


@pytest.mark.parametrize("arch", [80, 90])
def test_scaled_gap_rounds_both_products_so_the_max_has_a_gap_of_0(tmp_path, arch):
    """scaled_gap at tau >= 1 took x * scale - m * scale, which nvcc contracts to an FFMA (seen on
    sm_90): for x = m that is m * scale's rounding error, not 0, and past |m * scale| = 2^31 exp2 of
    it is 0 or inf (a session-66 audit found it in the CPU kernel; the emulator, built by g++ here,
    does not contract). Both products are now rounded (__fmul_rn): no FFMA in its SASS."""
    tool = nvdisasm()
    if tool is None:
        pytest.skip("no nvdisasm (it comes with Triton)")
    source = tmp_path / "gap.cu"
    source.write_text('#include "lelp/row_math.h"\n'
                      'extern "C" __global__ void gap(const float* x, float* y, float m, float scale, int n) {\n'
                      '  int i = blockIdx.x * blockDim.x + threadIdx.x;\n'
                      '  if (i < n) y[i] = lelp::scaled_gap(x[i], m, scale);\n}\n')
    cubin = tmp_path / "gap.cubin"
    subprocess.run([NVCC, f"-arch=sm_{arch}", "-std=c++17", "-O3", "-I", os.path.join(ROOT, "csrc/include"),
                    "-cubin", str(source), "-o", str(cubin)], check=True, capture_output=True)
    text = subprocess.run([tool, "-c", str(cubin)], check=True, capture_output=True, text=True).stdout
    assert "FMUL" in text and "FFMA" not in text, text
