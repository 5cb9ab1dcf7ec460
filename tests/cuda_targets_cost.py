"""A cost model of the CUDA targets tile (csrc/cuda/targets.cu), read from its SASS without a GPU.

The model compiles csrc/cuda/targets.cu itself (``-lineinfo``) and reads, per modelled path, the
production kernel the launcher takes on sm_90 for it: the resident form where the map fits
(``targets_resident_kernel``, instantiated for the map's padded width at 16 or 32 columns, so that
its fragment addresses are constants), else the streaming tile; both for 16-byte rows. Per row,
on H100 and H200 (the constants of lelp_fast/kernels/triton/cost.py):

* bytes: h read once, the given logits, the output written once (fp32), and the split map's bytes
  (hi + lo, ``split_rows(d)`` x ``pad16(J)`` of 16 bits) once per row tile (streaming), or
  once per block over the rows a block takes (resident: a persistent grid of the blocks the SMs hold).
  The HBM moves h, the logits and the output (at the device's bandwidth); the SMs read h, the logits
  and the map from L2 (at ``cost.L2_READ_RATE``, as the Triton targets' model takes them; until
  2026-12-05 the map was counted at the HBM's bandwidth);
* instructions: the SASS of the row-tile loop (the largest natural loop), each instruction times the
  trips of the loops nested in the tile loop that hold it, issued by the block's 256 threads for
  its 64 rows (128: the resident form at 16 or 32 columns in 16 bits, the streaming form up to 160
  columns, ``streaming_row_frags``); the code outside the tile
  loop over the tiles a block takes. A nested loop's trips come from its source line (the line of
  its back edge, matched in ``trips_of``) at the path's shape; a loop whose line is not there
  fails the model. A loop the compiler unrolled in part would be counted several times over, so the
  kernel's lane- and thread-strided loops are ``#pragma unroll 1``. Every branch inside is counted
  on both sides (the shape, the warp's fragments, the dtypes and the edge rows are run-time values
  here, as in production): an upper bound of what a warp issues; code that only a ``CALL`` or
  ``BRA.DIV`` reaches is not counted;
* tensor-core time: ``2 split_rows(d) pad16(J)`` FLOP per row per product (the 128-row streaming
  tile's 2 x 16 x paired_frags columns, 160 at J = 144) at bf16's 4,096 FLOP per SM and clock
  (bf16/fp16: h times the map's hi and lo, 2; fp32, h split into bf16 hi + lo too: hi*hi + hi*lo +
  lo*hi, 3).

Modelled time = the slowest of the HBM, L2, issue, MUFU and tensor cores; the budget is 1.25x the floor
(h, the logits and the output moved once). ``python tests/cuda_targets_cost.py`` prints the table
docs/benchmarks.md quotes.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
from typing import Dict, List, NamedTuple

import cuda_cost  # noqa: E402 (tests/ is on sys.path under pytest and as a script)

ROOT = cuda_cost.ROOT
NVCC = cuda_cost.NVCC
D = 768  # the embedding width
ROWS = 4 * 2**20  # the rows
THREADS, ROWS_PER_TILE, STEP_K, RESIDENT_STEP_K = 256, 64, 32, 64  # tile::kThreads, kRows, kStepK, kResidentStepK
SMEM_OPT_IN_SM90 = 232_448
SMEM_PER_SM = 233_472  # Hopper: 228 KB of shared memory per SM, 1 KB of it reserved per block


class InputType(NamedTuple):
    """What a dtype of the embeddings takes in the tile (csrc/cuda/targets.cu)."""
    mma: str  # the Mma type's part of the kernels' mangled names
    h_bytes: int  # an embedding (Mma::Raw), as read and staged
    products: int  # per map entry: bf16 h * hi, h * lo; fp32 h_hi * hi, h_hi * lo, h_lo * hi


TYPES = {"bf16": InputType("HalfMmaI13__nv_bfloat16EE", 2, 2), "fp32": InputType("SplitFloatMmaE", 4, 3)}
MAP_BYTES = 2  # a map part's entry (Mma::Stage, tile::kMapBytes)
MMA_FLOP_PER_SM_CLOCK = 4096  # bf16/fp16 dense tensor-core rate on sm_90
MMA_K = 16  # Mma::kK


class TargetsPath(NamedTuple):
    dtype: str
    num_classes: int
    n_subclasses: int
    head: bool  # the teacher's logits from the map's head columns (else given)

    @property
    def k(self) -> int:
        return self.num_classes * self.n_subclasses

    @property
    def j(self) -> int:
        return self.k + (self.num_classes if self.head else 0)


COST_PATHS = [TargetsPath(dt, c, s, head) for (c, s) in ((4, 4), (16, 8)) for dt in ("bf16", "fp32")
              for head in (True, False)]


def kernel_name_parts(p: TargetsPath, form: dict) -> List[str]:
    """Parts of the mangled name of the kernel the launcher takes for p (16-byte rows)."""
    mma = TYPES[p.dtype].mma
    if form["resident"]:
        return ["targets_resident_kernel", mma + f"Lb1ELi{form['cols']}E"]
    return ["targets_tile_kernel", mma + f"Lb1ELi{form['row_frags']}ELi{form['frags']}E"]


def layouts(paths: List[TargetsPath]) -> Dict[TargetsPath, dict]:
    """Per path, from the header's own functions compiled for the host: whether the launcher takes
    the resident form on sm_90, the form's shared memory, split_rows(d), pad16(J) and the width the
    resident form is instantiated for (resident_cols)."""
    statements = []
    for p in paths:
        stage = TYPES[p.dtype].h_bytes
        statements.append(
            f"{{ lelp::TargetsArgs a{{}}; a.d = {D}; a.C = {p.num_classes}; a.S = {p.n_subclasses}; a.J = {p.j}; "
            f"using namespace lelp::tile; const bool r = resident_takes(a, {stage}, {SMEM_OPT_IN_SM90}); "
            f"const int rf = streaming_row_frags(a, {stage}, true, kSm90SmemPerSm); "
            f'std::printf("%d %lld %lld %d %d %d %d %d\\n", r, (long long)(r ? resident_smem_bytes(a, {stage}) '
            f': smem_bytes(a, {stage}, rf)), (long long)split_rows(a.d), split_cols(a.J), resident_cols(a), '
            f'r ? kRows * resident_row_frags(a, {stage}) : kRows * rf, rf, rf == 2 ? paired_frags(a) : kMaxFrags); }}')
    statements.append('std::printf("%d %d %d %d %d\\n", lelp::tile::kThreads, lelp::tile::kRows, lelp::tile::kStepK, '
                      "lelp::tile::kResidentStepK, lelp::tile::kMapBytes);")
    out = cuda_cost.host_program_output("lelp/block_targets.h", statements)
    constants = tuple(map(int, out.pop().split()))  # the trip table's constants are the header's
    assert constants == (THREADS, ROWS_PER_TILE, STEP_K, RESIDENT_STEP_K, MAP_BYTES), constants
    return {p: dict(zip(("resident", "smem", "map_rows", "map_cols", "cols", "tile_rows", "row_frags", "frags"),
                        map(int, line.split())))
            for p, line in zip(paths, out)}


def source_lines(cubin: str) -> Dict[str, Dict[int, tuple]]:
    """{kernel: {address: (file, line)}} from nvdisasm -g (Triton ships it)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    text = subprocess.run([tool, "-g", "-c", cubin], check=True, capture_output=True, text=True).stdout
    out, kernel, where = {}, None, None
    for line in text.splitlines():
        m = re.match(r"\s*\.text\.(\S+):", line)
        if m:
            kernel = out.setdefault(m.group(1), {})
            continue
        m = re.match(r'\s*//## File "([^"]+)", line (\d+)', line)
        if m:
            where = (m.group(1), int(m.group(2)))
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/", line)
        if m and kernel is not None:
            kernel[int(m.group(1), 16)] = where
    return out


def trips_of(statement: str, p: TargetsPath, resident: bool, tile_rows: int = ROWS_PER_TILE) -> int:
    """Trips of the loop whose back edge is on this source statement, at path p (lane 0 of a warp of
    the first column set), in the form and tile rows the launcher takes."""
    step = RESIDENT_STEP_K if resident else STEP_K
    C, S, K, J = p.num_classes, p.n_subclasses, p.k, p.j
    vec = 16 // TYPES[p.dtype].h_bytes  # Mma::kVec (embeddings a 16-byte copy)
    R = tile_rows // (THREADS // 32)
    table = {
        "for (int64_t s = 0; s < steps; ++s)": -(-D // step),  # the resident form's
        "for (int s = 0; s < steps; ++s)": -(-D // step),  # the streaming form's
        "for (int kk = 0; kk < kStep; kk += Mma::kK)": step // MMA_K,
        "for (int i = b.thread(); i < kTileRows * kStep / V; i += kThreads)": -(-tile_rows * step // vec // THREADS),
        "for (int e = 0; e < V; ++e)": vec,
        "for (int q = 0; q < kStepK / kWarps; ++q)": STEP_K // (THREADS // 32),  # the streaming step's map rows a warp
        "for (int r = r0; r < r0 + R; ++r)": R,
        "for (int j = lane; j < J; j += 32)": -(-J // 32),
        "for (int c = lane; c < C; c += 32)": -(-C // 32),
        "for (LanePairs p(lane, C); p.r < R; p.next())": -(-R * C // 32),
        "while (p.r < rows) {": -(-R * K // 32),  # the (row, element) pairs stored: every row below n
        "for (int k = lane; k < K; k += 32)": -(-K // 32),
        # lelp/row_math.h: shift_class_logits over a row's C class logits, subclass_log_softmax over a class's S
        "for (int i = 0; i < n; ++i) m = fmax_(m, x[i * stride]);": C,
        "for (int i = 0; i < n; ++i) acc += softmax_exp(x[i * stride] = (x[i * stride] - m) * scale);": C,
        "for (int i = 0; i < n; ++i) m = fmax_(m, x[i]);": S,
        "for (int i = 0; i < n; ++i) acc += softmax_exp((x[i] - m) * scale);": S,
        "for (int i = 0; i < n; ++i) out[i] = ((x[i] - m) * scale - lse) + offset;": S,
    }
    for key, trips in table.items():
        if key in statement:
            assert trips >= 1, (statement, trips)
            return trips
    raise ValueError(f"no trip count for the loop at: {statement.strip()}")


def statement(where: tuple) -> str:
    path, line = where
    with open(path) as f:
        return f.readlines()[line - 1]


def tile_facts(instructions: List[tuple], lines: Dict[int, tuple], p: TargetsPath, resident: bool,
               tile_rows: int = ROWS_PER_TILE) -> dict:
    """Per thread: instructions and MUFU operations of one row tile (the tile loop, with its nested
    loops' trips) and of the code outside it (once per block); the statements of the loops nested
    in the tile loop and of those outside it."""
    found = cuda_cost.natural_loops(instructions)
    tile_loop = found[0][0]
    weight = [1.0] * len(instructions)
    facts = {"tile": 0.0, "tile_mufu": 0.0, "tile_copies": 0.0, "outside": 0.0, "inner_loops": [], "outer_loops": [],
             "loop_opcodes": {}}
    for body, ends in found[1:]:
        where = statement(lines[instructions[ends[0]][0]]).strip()
        if not body < tile_loop:
            facts["outer_loops"].append(where)
            continue
        trips = trips_of(where, p, resident, tile_rows)
        facts["inner_loops"].append(where)
        # each nested loop's body once, by opcode (the innermost loop of a statement, if several)
        facts["loop_opcodes"][where] = collections.Counter(cuda_cost.opcode(instructions[i][1]) for i in body)
        for i in body:
            weight[i] *= trips
    for i, (_, ins) in enumerate(instructions):
        if i in tile_loop:
            facts["tile"] += weight[i]
            facts["tile_mufu"] += weight[i] * (cuda_cost.opcode(ins) in cuda_cost.MUFU_COUNTED)
            facts["tile_copies"] += weight[i] * cuda_cost.opcode(ins).startswith("LDGSTS.E.BYPASS.128")
        else:
            facts["outside"] += 1
    return facts


def model(paths: List[TargetsPath] = COST_PATHS, arch: int = 90) -> Dict[TargetsPath, Dict[str, float]]:
    """{path: {form, bytes per row (h, logits, out, map, floor), instructions per row, over-floor per device}}."""
    from lelp_fast.kernels.triton import cost

    forms = layouts(paths)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "targets.cubin")
        subprocess.run([NVCC, f"-arch=sm_{arch}", "-std=c++17", "-O3", "-lineinfo", "-I",
                        os.path.join(ROOT, "csrc/include"), "-I", os.path.join(ROOT, "csrc"), "-cubin",
                        os.path.join(ROOT, "csrc/cuda/targets.cu"), "-o", cubin], check=True, capture_output=True)
        sass, lines = cuda_cost.cubin_sass(cubin), source_lines(cubin)
    out = {}
    for p in paths:
        form = forms[p]
        h_item = TYPES[p.dtype].h_bytes
        (name,) = [n for n in sass if all(part in n for part in kernel_name_parts(p, form))]
        facts = tile_facts(sass[name], lines[name], p, bool(form["resident"]), form["tile_rows"])
        rows = form["tile_rows"]
        tiles = -(-ROWS // rows)
        if form["resident"]:  # one block per SM at these shapes: its shared memory (and registers) hold no second
            blocks = min(tiles, max(1, min(SMEM_PER_SM // (form["smem"] + 1024), 8)) * cost.SMS)
        else:
            blocks = tiles  # a block per tile (up to 2^20 blocks)
        map_bytes = 2 * form["map_rows"] * form["map_cols"] * MAP_BYTES
        moved = {"h": D * h_item, "logits": 0 if p.head else p.num_classes * h_item, "out": 4 * p.k,
                 "map": map_bytes / (ROWS / blocks if form["resident"] else rows)}
        floor = moved["h"] + moved["logits"] + moved["out"]
        per_tile = facts["tile"] + facts["outside"] * blocks / tiles
        instructions = per_tile * THREADS / rows
        mufu = facts["tile_mufu"] * THREADS / rows
        # the columns the MMAs take: the 128-row streaming tile computes all its 2 x 16 x frags columns
        # (those past the map's width are not stored: block_targets.h's step_products)
        mma_cols = 2 * 16 * form["frags"] if not form["resident"] and form["row_frags"] == 2 else form["map_cols"]
        flops = 2.0 * form["map_rows"] * mma_cols * TYPES[p.dtype].products
        e = {"form": "resident" if form["resident"] else "streaming", **moved, "floor": floor,
             "instructions": instructions, "mufu": mufu, "flops": flops, "smem": form["smem"],
             "inner_loops": facts["inner_loops"], "outer_loops": facts["outer_loops"],
             "loop_opcodes": facts["loop_opcodes"],
             "copied_per_row": facts["tile_copies"] * 16 * THREADS / rows, "tile_rows": rows}
        for device, bandwidth in cost.BANDWIDTH.items():
            # the HBM moves h, the logits and the output; the SMs read h, the logits and the map's
            # stream from L2, at the rate the Triton model takes (cost.L2_READ_RATE)
            times = {"memory": (moved["h"] + moved["logits"] + moved["out"]) / bandwidth,
                     "l2": (moved["h"] + moved["logits"] + moved["map"]) / cost.L2_READ_RATE,
                     "issue": instructions / cost.THREAD_INSTRUCTIONS_PER_S,
                     "mufu": mufu / cost.MUFU_PER_S,
                     "mma": flops / (cost.SMS * MMA_FLOP_PER_SM_CLOCK * cost.CLOCK_HZ)}
            e[device] = {k: v / (floor / bandwidth) for k, v in times.items()}
            e[device]["over_floor"] = max(e[device].values())
        out[p] = e
    return out


def table(results: Dict[TargetsPath, Dict[str, float]]) -> str:
    lines = ["| dtype | K (C x S) | logits | form, shared memory | bytes / row: h + map + logits + out (floor) "
             "| SASS / row | H100: HBM, L2, issue, MMA / floor | H200 |", "|" + "---|" * 8]
    for p, e in results.items():
        cells = []
        for device in ("H100", "H200"):
            d = e[device]
            terms = ", ".join(f"{d[term]:.2f}" for term in ("memory", "l2", "issue", "mma"))
            cells.append(f"{terms} → **{d['over_floor']:.2f}**")
        lines.append(f"| {p.dtype} | {p.k} ({p.num_classes} x {p.n_subclasses}) | {'no' if p.head else 'yes'} "
                     f"| {e['form']}, {e['smem']:,} B | {e['h']:.0f} + {e['map']:.0f} + {e['logits']:.0f} + "
                     f"{e['out']:.0f} ({e['floor']:.0f}) | {e['instructions']:.0f} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(model()))
