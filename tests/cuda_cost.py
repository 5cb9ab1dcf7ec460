"""A cost model of the CUDA loss kernel (csrc/cuda/loss.cu), read from its SASS without a GPU.

The production kernel is one template per lane layout (W lanes per row, CH chunks of V = 4 or 5
values per lane: ``warp::loss_layout``) whose divergence, dtypes, labels and subclass weight are
runtime arguments, so its loop holds every path. The model compiles the same body (lelp/warp_loss.h
with csrc/cuda/warp.cuh) once per modelled path, in the layout the kernel takes for it, with that
path's arguments fixed in the kernel (the KL divergence, one dtype, precomputed targets of one
teacher, 16-byte rows in chunks of 4; labels and λ as the path says; τ = 2 with the
hard-label term, whose exponentials depend on τ), so the compiler drops the other paths. C, S, α,
λ and τ without labels stay runtime values, as in production. The class-wise form the kernel picks
by S and the lane layout (``warp::ClassSumsForm``: classes of whole chunks, reduce-scattered or by slot, or not, which
decides the class sums' form at λ ≠ 1 and the hard-label term's) is forced, so only it is counted. Not counted: the
uniform branches that skip the other paths (a few per row), and the warps' exact fallbacks when a
class holds less than 2^-90 of a row's q (``CostWarp::any`` is false).

Instructions per element: the static SASS of the row loop (the largest natural loop of the
control-flow graph, with the blocks the compiler placed after its back edge; code that only a
``BRA.DIV`` or a ``CALL`` reaches is not in it; both sides of a branch inside are counted), issued
once per warp for its 32 / W rows, times 32 threads, over the rows' K elements. At λ ≠ 1 through
shared memory a lane's class loop runs ceil(C / W) times a row, and its loop over a class's chunks
after the first as often as a class can span them (``Path.chunks_after_first``). Held against the
budgets of lelp_fast/kernels/triton/cost.py (the same H100/H200 figures and floor bytes).

``python tests/cuda_cost.py`` prints the table docs/benchmarks.md quotes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from typing import Dict, List, NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc")
DTYPES = {"fp32": 0, "bf16": 2}  # lelp::DType codes
FLOOR_BYTES = {"fp32": 12, "bf16": 6}  # read s and t, write the gradient, in the student's dtype


class Path(NamedTuple):
    """One modelled path of the KL step: its shape, dtype, and which of the optional terms it takes."""
    num_classes: int
    n_subclasses: int
    dtype: str
    labels: bool  # the hard-label term (α ≠ 0 with labels)
    weighted: bool  # the subclass weight λ ≠ 1
    tau: int = 0  # τ fixed in the kernel (the hard-label term's exponentials depend on it); 0: runtime

    def class_sums(self, w: int, ch: int, v: int) -> int:
        """The class-wise form the kernel takes for this S on W lanes of CH chunks of V (``warp::class_sums_form``):
        when S / V is a power of two, classes of whole chunks, the class sums at λ ≠ 1 in registers
        and the hard-label term a chunk at a time: reduce-scattered (3) where a class is one slot of
        8 or more lanes of 4 chunks of 4, else by slot (1); otherwise (2) the class sums through shared
        memory, the hard-label term element by element."""
        chunks = self.n_subclasses // v
        if not (self.n_subclasses % v == 0 and chunks & (chunks - 1) == 0):
            return 2
        return 3 if v == 4 and ch == 4 and 8 <= chunks <= w else 1

    @property
    def chunks_after_first(self) -> int:
        """The most chunks of 4 a class spans after its first one (classes start at c S)."""
        s = self.n_subclasses
        r = {0: 0, 2: 2}.get(s % 4, 3)  # the largest c S mod 4 over c
        return (s - 1 + r) // 4

    @property
    def k(self) -> int:
        return self.num_classes * self.n_subclasses

    @property
    def name(self) -> str:
        return f"K{self.k}_C{self.num_classes}_{self.dtype}_{'alpha' if self.labels else 'plain'}" \
               f"{'_lambda' if self.weighted else ''}"


SOURCE_HEAD = """
#include <cuda_runtime.h>
#include "cpu/loss.h"
#include "lelp/warp_loss.h"
#include "cuda/warp.cuh"
namespace lelp {
// The path where no class of a row holds less than 2^-90 of its q: the warps' exact fallbacks
// (row_hard_label, row_class_kl_exact) are dropped from the count. FORM: the class-wise form
// (warp::ClassSums: 1 classes of whole chunks by slot, 3 reduce-scattered, 2 any).
template <int W, int FORM>
struct CostWarp : cuda::DeviceWarp<W> {
  __device__ __forceinline__ bool any(bool) const { return false; }
};
namespace warp {
template <int W, int FORM>
struct ClassSumsForm<CostWarp<W, FORM>> {
  static constexpr int value = FORM;
};
}  // namespace warp
template <int W, int CH, int V, int DT, bool LABELS, bool WEIGHTED, int TAU, int FORM>
__global__ void __launch_bounds__(128, CH >= 4 ? 3 : 4) kl_path(LossArgs a) {  // as loss.cu's kMinBlocks
  a.divergence = kKL;
  if (TAU > 0) a.tau = TAU;
  a.student_dtype = a.targets_dtype = a.grad_dtype = DT;
  a.weights = nullptr;
  a.online = nullptr;
  a.n_teachers = 1;
  if (!LABELS) a.labels = nullptr, a.alpha = 0.f;
  if (!WEIGHTED) a.subclass_weight = 1.f;
  warp::OnlineTeachers online{};
  online.m = 0;
  extern __shared__ float smem[];  // the class sums' scratch at λ ≠ 1 (loss.cu sizes it)
  const int64_t warp_id = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;
  const int64_t row_floats = warp::loss_row_scratch_floats(a, false);
  float* scratch = WEIGHTED ? smem + (threadIdx.x / 32) * (32 / W) * row_floats : nullptr;
  warp::loss_rows<CostWarp<W, FORM>, CH, V>(CostWarp<W, FORM>{}, a, online, scratch, warp_id,
                                             static_cast<int64_t>(gridDim.x) * 4, V == warp::kVec);
}
"""


def path_source(paths: List[Path], layouts: Dict[Path, tuple]) -> str:
    lines = [SOURCE_HEAD]
    seen = set()
    for p in paths:
        w, ch, v = layouts[p]
        if kernel_key(p, w, ch, v) in seen:  # one kernel serves every K of the same layout
            continue
        seen.add(kernel_key(p, w, ch, v))
        lines.append(f"template __global__ void kl_path<{w}, {ch}, {v}, {DTYPES[p.dtype]}, {str(p.labels).lower()}, "
                     f"{str(p.weighted).lower()}, {p.tau}, {p.class_sums(w, ch, v)}>(LossArgs);")
    lines.append("}  // namespace lelp")
    return "\n".join(lines)


def kernel_key(p: Path, w: int, ch: int, v: int) -> str:
    """The mangled-name part of one instantiation (template arguments W, CH, V, DT, LABELS, WEIGHTED,
    TAU, FORM): kl_pathILi<W>ELi<CH>ELi<V>ELi<DT>ELb<0|1>ELb<0|1>ELi<TAU>ELi<FORM>E."""
    return (f"kl_pathILi{w}ELi{ch}ELi{v}ELi{DTYPES[p.dtype]}ELb{int(p.labels)}ELb{int(p.weighted)}"
            f"ELi{p.tau}ELi{p.class_sums(w, ch, v)}E")


def host_program_output(header: str, statements: List[str]) -> List[str]:
    """The lines a host program prints that includes ``header`` (from csrc/include) and runs
    ``statements`` in main(): the headers' own functions, compiled by g++."""
    gxx = shutil.which("g++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "main.cpp")
        with open(src, "w") as f:
            f.write(f'#include <cstdio>\n#include "{header}"\nint main() {{\n')
            f.writelines(f"  {statement}\n" for statement in statements)
            f.write("}\n")
        exe = os.path.join(tmp, "main")
        subprocess.run([gxx, "-std=c++17", "-I", os.path.join(ROOT, "csrc/include"), "-I", os.path.join(ROOT, "csrc"),
                        src, "-o", exe], check=True, capture_output=True)
        return subprocess.run([exe], check=True, capture_output=True, text=True).stdout.splitlines()


def shapes_of(ks) -> Dict[int, tuple]:
    """{K: (W, CH)} in chunks of 4 by the header's own ``loss_shape``, compiled for the host."""
    out = host_program_output("lelp/warp_loss.h", [
        f'{{ int w, ch; lelp::warp::loss_shape({k}, 4, &w, &ch); std::printf("%d %d %d\\n", {k}, w, ch); }}'
        for k in ks])
    return {int(k): (int(w), int(ch)) for k, w, ch in (line.split() for line in out)}


def layouts_of(paths: List[Path]) -> Dict[Path, tuple]:
    """{path: (W, CH, V)} by the header's own ``loss_layout`` (the KL of one precomputed teacher, with
    labels and α = 0.1 where the path has the hard-label term, λ = 0.5 where it is weighted)."""
    statements = ["static int64_t y = 0;"]
    for p in paths:
        statements.append(
            f"{{ lelp::LossArgs a{{}}; a.C = {p.num_classes}; a.S = {p.n_subclasses}; a.divergence = lelp::kKL; "
            f"a.tau = 2.f; a.subclass_weight = {0.5 if p.weighted else 1.0}f; "
            f"a.alpha = {0.1 if p.labels else 0.0}f; a.labels = {'&y' if p.labels else 'nullptr'}; "
            f"int w, ch, v; lelp::warp::loss_layout(a, &w, &ch, &v); std::printf(\"%d %d %d\\n\", w, ch, v); }}")
    out = host_program_output("lelp/warp_loss.h", statements)
    return {p: tuple(int(x) for x in line.split()) for p, line in zip(paths, out)}


def cubin_sass(cubin: str) -> Dict[str, List[tuple]]:
    """{kernel name: [(address, instruction)]} from cuobjdump -sass (Triton ships it)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    text = subprocess.run([tool, "-sass", cubin], check=True, capture_output=True, text=True).stdout
    out = {}
    for chunk in re.split(r"\n\s*Function : ", text)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        out[name] = [(int(m.group(1), 16), m.group(2).strip())
                     for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", chunk)]
    return out


def opcode(instruction: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0]


def _successors(instructions: List[tuple]) -> List[List[int]]:
    """Per instruction, the indices control may pass to: the next instruction unless an unpredicated
    BRA, EXIT or RET ends it, and a branch's target. A BRA.DIV's target (the shuffles' path for a
    diverged warp, which these kernels never take) is left out, so code only it reaches is in no loop."""
    index = {addr: i for i, (addr, _) in enumerate(instructions)}
    out = []
    for i, (_, ins) in enumerate(instructions):
        op = opcode(ins)
        nxt = [i + 1] if i + 1 < len(instructions) else []
        m = re.search(r"\bBRA(?:\.\w+)*\s+(?:\w+,\s*)?(0x[0-9a-f]+)", ins)
        if op.startswith("BRA.DIV"):
            out.append(nxt)
        elif op.startswith("BRA") and m:
            target = [index[int(m.group(1), 16)]]
            out.append(target + nxt if ins.startswith("@") else target)
        elif op.startswith(("EXIT", "RET", "BPT")) and not ins.startswith("@"):
            out.append([])
        else:
            out.append(nxt)
    return out


def _predecessors(succ: List[List[int]]) -> List[List[int]]:
    pred = [[] for _ in succ]
    for i, targets in enumerate(succ):
        for j in targets:
            pred[j].append(i)
    return pred


def _immediate_dominators(succ: List[List[int]], pred: List[List[int]]) -> List[int]:
    """idom of each instruction reachable from the first (Cooper, Harvey and Kennedy's iteration over
    reverse postorder); -1 where unreachable."""
    order, seen, stack = [], {0}, [(0, iter(succ[0]))]
    while stack:  # postorder, iteratively
        node, it = stack[-1]
        nxt = next((j for j in it if j not in seen), None)
        if nxt is None:
            order.append(node)
            stack.pop()
        else:
            seen.add(nxt)
            stack.append((nxt, iter(succ[nxt])))
    rank = {node: r for r, node in enumerate(order)}  # postorder number
    idom = [-1] * len(succ)
    idom[0] = 0
    changed = True
    while changed:
        changed = False
        for node in reversed(order[:-1]):
            done = [p for p in pred[node] if idom[p] != -1]
            new = done[0]
            for p in done[1:]:
                a, b = p, new
                while a != b:
                    while rank[a] < rank[b]:
                        a = idom[a]
                    while rank[b] < rank[a]:
                        b = idom[b]
                new = a
            if idom[node] != new:
                idom[node] = new
                changed = True
    return idom


def _dominates(idom: List[int], a: int, b: int) -> bool:
    while b != a and b != 0 and idom[b] != -1:
        b = idom[b]
    return b == a


def natural_loops(instructions: List[tuple]) -> List[tuple]:
    """The natural loops as (body, back-edge tails): instruction index sets, largest first. Per loop
    head (the target of an edge from an instruction it dominates), every instruction that reaches one
    of those edges without passing the head. (A branch back to a lower address that its target does
    not dominate, such as an out-of-line block's return, makes no loop.)"""
    succ = _successors(instructions)
    pred = _predecessors(succ)
    idom = _immediate_dominators(succ, pred)
    tails = {}
    for i, targets in enumerate(succ):
        for j in targets:
            if idom[i] != -1 and _dominates(idom, j, i):
                tails.setdefault(j, []).append(i)
    out = []
    for head, ends in tails.items():
        body, stack = {head, *ends}, list(ends)
        while stack:
            for j in pred[stack.pop()]:
                if j not in body and idom[j] != -1:
                    body.add(j)
                    stack.append(j)
        out.append((body, ends))
    return sorted(out, key=lambda loop: len(loop[0]), reverse=True)


def loops(instructions: List[tuple]) -> List[set]:
    """The natural loops' bodies, largest first (natural_loops)."""
    return [body for body, _ in natural_loops(instructions)]


# The MUFU operations counted: the exponentials and logarithms the Triton model counts, and the
# reciprocals this kernel takes per class (rcp.approx): the same unit, 16 operations per SM and clock.
MUFU_COUNTED = ("MUFU.EX2", "MUFU.LG2", "MUFU.RCP")


def row_loop_facts(instructions: List[tuple], trips=()) -> Dict[str, float]:
    """Static instructions and MUFU operations of the row loop (the largest loop); an instruction in
    d of the loops nested in it runs trips[0] * ... * trips[d - 1] times per row."""
    found = loops(instructions)
    row = found[0]
    inner = [body for body in found[1:] if body < row]
    total, mufu = 0.0, 0.0
    for i in row:
        depth = sum(1 for body in inner if i in body)
        if depth > len(trips):
            raise ValueError(f"a loop {depth} deep at {instructions[i][0]:#x}, trips given for {len(trips)}")
        times = 1.0
        for n in trips[:depth]:
            times *= n
        total += times
        if opcode(instructions[i][1]) in MUFU_COUNTED:
            mufu += times
    return {"instructions": total, "mufu": mufu, "inner_loops": len(inner)}


def model(paths: List[Path], arch: int = 90) -> Dict[Path, Dict[str, float]]:
    """{path: {W, CH, instructions and mufu per element, registers, over-floor ratios}}."""
    from lelp_fast.kernels.triton import cost

    layouts = layouts_of(paths)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "paths.cu")
        with open(src, "w") as f:
            f.write(path_source(paths, layouts))
        cubin = os.path.join(tmp, "paths.cubin")
        subprocess.run([NVCC, f"-arch=sm_{arch}", "-std=c++17", "-O3", "-I", os.path.join(ROOT, "csrc/include"),
                        "-I", os.path.join(ROOT, "csrc"), "-cubin", src, "-o", cubin], check=True, capture_output=True)
        sass = cubin_sass(cubin)
    out = {}
    for p in paths:
        w, ch, v = layouts[p]
        key = kernel_key(p, w, ch, v)
        (name,) = [n for n in sass if key in n]
        # λ ≠ 1 through shared memory (row_class_kl): the busiest lane's classes, and per class the
        # chunks after its first: (S - 1 + r) // 4 at most, r the largest offset c S mod 4 of a class's start
        trips = (-(-p.num_classes // w), p.chunks_after_first) if p.weighted and p.class_sums(w, ch, v) == 2 else ()
        facts = row_loop_facts(sass[name], trips)
        elements = (32 // w) * p.k  # per warp and iteration
        e = {"W": w, "CH": ch, "V": v, "instructions": facts["instructions"] * 32 / elements,
             "mufu": facts["mufu"] * 32 / elements}
        floor = FLOOR_BYTES[p.dtype]
        for device in ("H100", "H200"):
            e[device] = cost.modelled_ratio(e["instructions"], e["mufu"], floor, floor, device)
        out[p] = e
    return out


# The Triton loss's cost shapes (lelp_fast/kernels/triton/loss.py: COST_KS, WEIGHTED_COST_SHAPES); τ = 2
# with the hard-label term. At λ = 1 also 8 x 5 with it, which takes chunks of 5 (warp::chunk_width).
COST_PATHS = [Path(c, s, dt, labels, False, 2 if labels else 0) for (c, s) in ((2, 8), (5, 8), (16, 8), (16, 32))
              for dt in ("bf16", "fp32") for labels in (False, True)] + [
              Path(8, 5, dt, True, False, 2) for dt in ("bf16", "fp32")]
WEIGHTED_COST_PATHS = [Path(c, s, dt, labels, True, 2 if labels else 0)
                       for (c, s) in ((2, 8), (8, 5), (8, 16), (8, 64), (16, 8), (12, 10), (16, 5))
                       for dt in ("bf16", "fp32") for labels in (False, True)]


def table(results: Dict[Path, Dict[str, float]]) -> str:
    lines = ["| K (C x S) | dtype | λ | α term | W x CH x V | SASS / element | MUFU.EX2+LG2+RCP / element "
             "| modelled / floor H100 | H200 |", "|" + "---|" * 9]
    for p, e in results.items():
        lines.append(f"| {p.k} ({p.num_classes} x {p.n_subclasses}) | {p.dtype} | {'≠ 1' if p.weighted else '1'} "
                     f"| {'yes' if p.labels else 'no'} "
                     f"| {e['W']} x {e['CH']} x {e['V']} | {e['instructions']:.0f} | {e['mufu']:.2f} | {e['H100']:.2f} "
                     f"| {e['H200']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(model(COST_PATHS + WEIGHTED_COST_PATHS)))
