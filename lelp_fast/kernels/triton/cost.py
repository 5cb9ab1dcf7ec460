"""A cost model of the Triton loss and targets kernels, read without a GPU (the targets' part is in
its own section below). The loss: instructions and MUFU.EX2/LG2 per
element from its SASS (``aot.kernel_facts``), global-memory bytes per element from the launcher
(every N x K tensor an op of the whole forward + backward step reads or writes, counted on the CPU
under a dispatch mode), held against budgets derived from the H100/H200 bandwidth and issue rate.

Modelled, not measured: the static SASS count is what each thread issues once (the kernel is
straight-line code apart from the M-teacher loop; the hard-label term is a compile-time
variant, ``HARD``), and the device figures are datasheet leads. docs/benchmarks.md quotes the
tables ``python -m lelp_fast.kernels.triton.cost FACTS.json`` prints from ``aot``'s facts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
from typing import Callable, Dict, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# Hopper SXM: 132 SMs, 4 warp schedulers each issuing one warp instruction (32 threads) per clock,
# ~1.75 GHz under load; 16 MUFU lanes per SM per clock (the CUDA C++ programming guide's throughput
# table: exp2/log2/rcp at compute capability 9.0). Bandwidths: datasheets (H100 SXM 80 GB, H200).
SMS, SCHEDULERS, CLOCK_HZ = 132, 4, 1.75e9
THREAD_INSTRUCTIONS_PER_S = SMS * SCHEDULERS * CLOCK_HZ * 32
MUFU_PER_S = SMS * 16 * CLOCK_HZ
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}
# The gates (issue 21), at K >= 16 and the bf16 floor of 6 B/element: within the H200's budgets below
# (37 instructions, 4.6 MUFU per element) up to rounding, with room for the per-row work.
MAX_INSTRUCTIONS_PER_ELEMENT = 40
MAX_MUFU_PER_ELEMENT = 3
# With the hard-label term (issue 21's bound on every loss kernel): modelled time over the floor on
# both devices; at τ other than 1 and 2 three exponentials per element (s/τ, t, s) are the
# minimum, and the per-row ones (the class share, log Z) come on top: 0.06-0.12 per element.
MAX_LOSS_OVER_FLOOR = 1.5
MAX_MUFU_PER_ELEMENT_ANY_TAU = 3.25


def budgets(floor_bytes: float) -> Dict[str, Dict[str, float]]:
    """Per device: the instructions and MUFU operations one element may take and still hide under
    the time its floor bytes take at the device's bandwidth."""
    out = {}
    for name, bandwidth in BANDWIDTH.items():
        seconds = floor_bytes / bandwidth
        out[name] = {"instructions": seconds * THREAD_INSTRUCTIONS_PER_S, "mufu": seconds * MUFU_PER_S}
    return out


def per_element(facts: Dict[str, int], block_n: int, k: int, num_warps: int) -> Dict[str, float]:
    """Thread instructions and MUFU.EX2/LG2 per (unpadded) element: each of the program's
    ``num_warps * 32`` threads issues the kernel's static SASS once for ``block_n * k`` elements."""
    threads = num_warps * 32
    return {"instructions": facts["sass"] * threads / (block_n * k),
            "mufu": facts["mufu_ex2_lg2"] * threads / (block_n * k)}


def modelled_ratio(instructions: float, mufu: float, bytes_per_element: float, floor_bytes: float,
                   device: str) -> float:
    """Modelled time over the floor: the slowest of memory, issue and MUFU, per element."""
    memory = bytes_per_element / BANDWIDTH[device]
    issue = instructions / THREAD_INSTRUCTIONS_PER_S
    special = mufu / MUFU_PER_S
    return max(memory, issue, special) / (floor_bytes / BANDWIDTH[device])


class _Bytes(TorchDispatchMode):
    """Adds up the bytes of every tensor of at least ``min_numel`` elements that an op reads or writes
    (views and allocations move nothing and are left out; an in-place op reads and writes; an
    ``out=`` tensor is only written)."""

    def __init__(self, min_numel: int):
        super().__init__()
        self.min_numel = min_numel
        self.total = 0
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__
        if func.is_view or name.startswith(("empty", "new_empty", "detach", "lift_fresh")):
            return out
        moved = 0
        reads = (args, {k: v for k, v in (kwargs or {}).items() if k != "out"})  # out= is written, not read
        for t in tree_flatten(reads)[0] + tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.min_numel:
                moved += t.numel() * t.element_size()
        if moved:
            self.ops.append((str(func), moved))
        self.total += moved
        return out


def step_bytes_per_element(step: Callable[[], None], n: int, k: int):
    """(bytes per element, [(op, bytes)]) of the N x K traffic of ``step`` (forward and backward)."""
    counter = _Bytes(n * k)
    with counter:
        step()
    return counter.total / (n * k), counter.ops


def loss_step_bytes(dtype: torch.dtype, n: int = 64, num_classes: int = 5, n_subclasses: int = 8,
                    backend: str = "cpu", subclass_weight: float = 1.0, forward_only: bool = False):
    """Bytes per element of one distillation step (loss forward + backward into the student's
    gradient) with student logits and targets in ``dtype``, through ``ops.distill_loss``'s
    launcher (one custom op for the kernel, whichever backend runs it). The Triton kernel writes
    the gradient in the student's dtype with the mean folded in; the CPU kernel writes it in fp32
    for the backward to scale and cast. ``backend="triton"`` on CPU tensors needs
    ``TRITON_INTERPRET=1`` before the kernels are imported. ``subclass_weight`` λ ≠ 1: the weighted
    KL (one pass, or two calls where the backend keeps them). ``forward_only``: the loss under
    ``torch.no_grad()``, no backward (an evaluation step)."""
    from ...ops import distill_loss

    k = num_classes * n_subclasses
    g = torch.Generator().manual_seed(0)
    student = torch.randn(n, k, generator=g).to(dtype).requires_grad_(True)
    log_t = torch.log_softmax(torch.randn(n, k, generator=g), -1).to(dtype)

    def step():
        loss = distill_loss(student, log_t, num_classes=num_classes, n_subclasses=n_subclasses, tau=2.0,
                            backend=backend, check_inputs=False, subclass_weight=subclass_weight)
        if not forward_only:
            loss.backward()

    if forward_only:
        with torch.no_grad():
            return step_bytes_per_element(step, n, k)
    return step_bytes_per_element(step, n, k)


# The hard-label term of a loss variant (the kernel's HARD), as docs/benchmarks.md names it
HARD_NAMES = {0: "no", 1: "τ = 1", 2: "τ = 2", 3: "other τ"}


def gated(constexprs: dict) -> bool:
    """The KL variants without teacher weights that the table shows and tests/test_triton_aot.py
    holds to the budgets: with the hard-label term at the cost model's K; without it at every
    compiled K >= 16 whose rows take 16-byte vectors (K a multiple of 8)."""
    from . import loss

    c = constexprs
    if (not c["WITH_GRAD"] or c["DIVERGENCE"] != 0 or c["HAS_WEIGHTS"] or c["SUBCLASS_WEIGHTED"] or c["K"] < 16
            or c["K"] % 8):
        return False
    return c["HARD"] > 0 and c["K"] in loss.COST_KS if c["HAS_LABELS"] else True


def weighted_gated(constexprs: dict) -> bool:
    """The λ ≠ 1 KL variants (``SUBCLASS_WEIGHTED``) that its table shows and tests/test_triton_aot.py
    holds to the loss's budget: the cost model's (C, S) (``loss.WEIGHTED_COST_SHAPES``), without
    teacher weights, with no labels or with the hard-label term at τ = 1 or 2 (at any other τ it
    takes a third exponential per element: over the MUFU budget by construction; those launches are
    compiled and gated for resources, not for time)."""
    from . import loss

    c = constexprs
    return bool(c["SUBCLASS_WEIGHTED"] and c["WITH_GRAD"] and not c["HAS_WEIGHTS"]
                and (not c["HAS_LABELS"] or c["HARD"] in (1, 2))
                and (c["K"] // c["S"], c["S"]) in loss.WEIGHTED_COST_SHAPES)


def weighted_time_gated(constexprs: dict) -> bool:
    """The λ ≠ 1 variants at the class groups' limits (``loss.WEIGHTED_GROUP_SHAPES``, the hard-label term
    at τ = 2) that tests/test_triton_aot.py holds to the loss's time budget. Not to the MUFU budget:
    with 3-12 elements a class, the class's own exponential, reciprocal and logarithm put them at
    up to 3.5 MUFU operations per element."""
    from . import loss

    c = constexprs
    return bool(c["SUBCLASS_WEIGHTED"] and c["WITH_GRAD"] and not c["HAS_WEIGHTS"] and c["HAS_LABELS"]
                and c["HARD"] == 2 and (c["K"] // c["S"], c["S"]) in loss.WEIGHTED_GROUP_SHAPES)


def _compiled_loss_cases(facts_json: str, bytes_bf16: float, bytes_fp32: float, keep):
    """(Triton version, [(constexprs, variant, α mode, arch, dtype, per-element facts, bytes, floor bytes,
    H100 and H200 ratios, columns)]) for the compiled loss variants whose constexprs ``keep`` accepts."""
    from . import loss

    with open(facts_json) as f:
        facts = json.load(f)
    out = []
    for row in facts["cases"]:
        op, i, arch, dts = row["case"]
        if (op != "loss" or row["error"] or len(dts) > 2 or not loss.first_launch(loss.VARIANTS[i])
                or not keep(loss.VARIANTS[i]["constexprs"])):
            continue
        v = loss.VARIANTS[i]
        c = v["constexprs"]
        hard = c["HARD"] if c["HAS_LABELS"] else 0
        e = per_element(row["facts"], c["BLOCK_N"], c["K"], v["num_warps"])
        moved, floor = (bytes_bf16, 6) if dts[0] == "bf16" else (bytes_fp32, 12)
        ratios = [modelled_ratio(e["instructions"], e["mufu"], moved, floor, d) for d in ("H100", "H200")]
        columns = f"({c['BLOCK_K']} + {c['BLOCK_K2']})" if c.get("BLOCK_K2") else f"{c['BLOCK_K']}"
        out.append((c, v, hard, arch, dts[0], e, moved, floor, ratios, columns))
    return facts["triton"], out


def loss_table(facts_json: str, bytes_bf16: float, bytes_fp32: float) -> str:
    """The Markdown table of docs/benchmarks.md from ``aot``'s facts: the ``gated`` KL loss variants,
    without the hard-label term and with it (by the τ the kernel is specialised for)."""
    version, cases = _compiled_loss_cases(facts_json, bytes_bf16, bytes_fp32, gated)
    lines = ["| Triton | arch | dtype | K | α term | BLOCK_N x BLOCK_K, warps | SASS / element "
             "| MUFU.EX2+LG2 / element | bytes / element (floor) | modelled / floor H100 | H200 |", "|" + "---|" * 11]
    rows = [((hard > 0, c["K"], hard, arch, dt),
             f"| {version} | sm_{arch} | {dt} | {c['K']} | {HARD_NAMES[hard]} "
             f"| {c['BLOCK_N']} x {columns}, {v['num_warps']} | {e['instructions']:.0f} | {e['mufu']:.2f} "
             f"| {moved:.0f} ({floor}) | {ratios[0]:.2f} | {ratios[1]:.2f} |")
            for c, v, hard, arch, dt, e, moved, floor, ratios, columns in cases]
    lines += [line for _, line in sorted(rows)]
    return "\n".join(lines)


def forward_only_table(facts_json: str) -> str:
    """The forward-only twins (``WITH_GRAD`` off) of the plain KL the cost model reads (no labels, no
    teacher weights): modelled time over their floor (s and t read: 4 B a bf16 element, 8 fp32), and
    the same launch with the gradient written (what a no_grad call ran before) over that floor."""
    from . import loss

    with open(facts_json) as f:
        facts = json.load(f)
    cases = {(tuple(r["case"][:3]), tuple(r["case"][3])): r for r in facts["cases"] if r["case"][0] == "loss"}
    lines = ["| Triton | arch | dtype | K | SASS / element, forward only (with gradient) | floor (B / element) "
             "| forward only / floor H100 | H200 | with gradient / the same floor H100 | H200 |", "|" + "---|" * 10]
    for (op_i_arch, dts), row in sorted(cases.items()):
        v = loss.VARIANTS[op_i_arch[1]]
        c = v["constexprs"]
        if (row["error"] or len(dts) > 2 or not loss.first_launch(v) or c["WITH_GRAD"] or c["DIVERGENCE"] != 0
                or c["SUBCLASS_WEIGHTED"]
                or c["HAS_LABELS"] or c["HAS_WEIGHTS"] or (c["K"], c["S"]) not in loss.COST_SHAPES):
            continue
        twin = cases[(("loss", loss.twin_index(op_i_arch[1]), op_i_arch[2]), dts)]
        if twin["error"]:
            continue
        floor = 4 if dts[0] == "bf16" else 8
        e, et = (per_element(r["facts"], c["BLOCK_N"], c["K"], v["num_warps"]) for r in (row, twin))
        ratios = [modelled_ratio(e["instructions"], e["mufu"], floor, floor, d) for d in ("H100", "H200")]
        before = [modelled_ratio(et["instructions"], et["mufu"], floor * 3 / 2, floor, d) for d in ("H100", "H200")]
        lines.append(f"| {facts['triton']} | sm_{op_i_arch[2]} | {dts[0]} | {c['K']} | {e['instructions']:.1f} "
                     f"({et['instructions']:.1f}) | {floor} | {ratios[0]:.2f} | {ratios[1]:.2f} | {before[0]:.2f} "
                     f"| {before[1]:.2f} |")
    return "\n".join(lines)


def weighted_loss_bytes(dtype: torch.dtype, num_classes: int = 5):
    """(one pass, two calls): bytes per element of the λ = 0.1 step on the Triton backend, in the
    kernel's own pass and as the two calls of the λ = 1 kernel that larger C keep."""
    from . import limits

    one, _ = loss_step_bytes(dtype, num_classes=num_classes, backend="triton", subclass_weight=0.1)
    kept = limits.MAX_FUSED_WEIGHTED_CLASSES
    limits.MAX_FUSED_WEIGHTED_CLASSES = 0
    try:
        two, _ = loss_step_bytes(dtype, num_classes=num_classes, backend="triton", subclass_weight=0.1)
    finally:
        limits.MAX_FUSED_WEIGHTED_CLASSES = kept
    return one, two


def _class_groups(c: dict) -> str:
    """' (T x G)' when a λ ≠ 1 tile holds G classes per thread on T threads a row (``loss.class_groups``)."""
    from . import loss

    t, g = loss.class_groups(c["K"] // c["S"], c["S"], c["HAS_WEIGHTS"])
    return f" ({t} x {g})" if g > 1 else ""


def weighted_loss_table(facts_json: str, bytes_bf16: float, bytes_fp32: float) -> str:
    """The subclass-weighted KL variants (``SUBCLASS_WEIGHTED``, no teacher weights) like
    :func:`loss_table`: modelled time over the floor of the plain step's bytes."""
    version, cases = _compiled_loss_cases(facts_json, bytes_bf16, bytes_fp32, weighted_gated)
    lines = ["| Triton | arch | dtype | K (C x S) | α term | BLOCK_N x BLOCK_K, warps | SASS / element "
             "| MUFU.EX2+LG2 / element | modelled / floor H100 | H200 |", "|" + "---|" * 10]
    rows = [((c["K"], hard, arch, dt),
             f"| {version} | sm_{arch} | {dt} | {c['K']} ({c['K'] // c['S']} x {c['S']}) "
             f"| {HARD_NAMES[hard]} | {c['BLOCK_N']} x {columns}{_class_groups(c)}, {v['num_warps']} "
             f"| {e['instructions']:.0f} | {e['mufu']:.2f} | {ratios[0]:.2f} | {ratios[1]:.2f} |")
            for c, v, hard, arch, dt, e, _, _, ratios, columns in cases]
    lines += [line for _, line in sorted(rows)]
    return "\n".join(lines)


# ---- The targets kernel (issue 21 item 4) ----------------------------------------------------------
# Dense tensor-core FLOP per SM per clock on Hopper: the H100 SXM datasheet's 989.4 (bf16/fp16) dense
# TFLOP/s are 132 SMs x 4096 x 1.83 GHz; taken here at CLOCK_HZ like the issue rate. A 16-bit input's
# hi + lo map takes two products; fp32 inputs, split into bf16 hi + lo, three (h_lo @ lo left out).
MMA_FLOP_PER_SM_CLOCK = {"bf16": 4096, "fp16": 4096}
MMA_PASSES = {"bf16": ("bf16", 2), "fp16": ("fp16", 2), "fp32": ("bf16", 3)}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
TARGETS_MAX_OVER_FLOOR = 1.25  # issue 21's goal for the targets, on H100 and H200
# Reads from L2 into the SMs: the targets stream their map from L2 once per row tile (and h once more
# per further class group). The H200's sweep of 2026-12-04 (docs/benchmarks.md) ran its fastest launches
# at K = 16 and 40 with 5.59 and 5.72 TB/s of such reads (counted as targets_bytes_per_row counts them:
# 2,304 B a row in 1.728 ms, 3,456 B in 2.533 ms, 4 M rows), above the HBM's 4.25 TB/s of copy; taken
# as the rate on the H100 too (the same chip and L2; not measured there). Until 2026-12-05 the map's
# stream was counted at the HBM's bandwidth: 1.48x the H200's floor (at 4.8 TB/s) modelled at K = 16
# with the head, where the launch measured 1.28-1.33x of that floor (1.12-1.17x of the copy rate's).
L2_READ_RATE = 5.6e12
# The issue's shapes: 4 M rows of d = 768, K = 16 and 128, and bench_gpu.py's K = 40 (COST_SHAPES in
# targets.py), fp32 out.
TARGETS_ROWS = 4 * 2**20
TARGETS_OUT_BYTES = 4


def targets_row_programs(n: int, block_n: int) -> int:
    """Programs per class group the launcher starts on an H100/H200 (``targets.row_programs``)."""
    from . import targets

    return max(1, min(-(-n // block_n), targets.PROGRAMS_PER_SM * SMS))


def targets_groups(v: dict, num_classes: int) -> int:
    """Programs per row tile: the class groups that hold a class (``targets.plan``; padding groups
    are not launched)."""
    return -(-num_classes // v["constexprs"]["C_BLOCK"])


def targets_map_columns(v: dict, num_classes: int) -> int:
    """The map columns a row tile's programs load, all class groups together: the stored subclass
    columns (``targets.sub_width``: no padding class) and each group's stored head columns."""
    from . import targets

    c = v["constexprs"]
    head_columns = targets.head_width(c["C_PAD"], c["S_PAD"], c["EXACT"])
    head = 0 if c["HAS_LOGITS"] else head_columns * targets_groups(v, num_classes)
    return targets.sub_width(num_classes, c["S_PAD"]) + head


def targets_bytes_per_row(v: dict, d: int, num_classes: int, n_subclasses: int,
                          out_bytes: int = TARGETS_OUT_BYTES) -> Dict[str, float]:
    """Global-memory bytes per row of the launch ``v`` (an entry of ``targets.VARIANTS``): h read once
    per class group, the teacher logits, the output written once, and the map's loaded columns
    (``targets_map_columns``) divided by the rows that one read of them serves (one row tile).
    ``dram``: what the HBM moves (h and the logits counted once per group, as if a second read missed
    L2); ``l2``: what the SMs read from L2 (h, the logits and the map stream). ``floor`` reads h and the
    logits once and writes the output once."""
    from . import targets

    c = v["constexprs"]
    item = DTYPE_BYTES[v["dtype"]]
    groups = targets_groups(v, num_classes)
    map_read = d * targets_map_columns(v, num_classes) * 2 * targets.map_dtype(
        targets.TORCH_DTYPES[v["dtype"]]).itemsize  # hi + lo
    rows_per_read = c["BLOCK_N"]
    h, logits = d * item, (num_classes * item if c["HAS_LOGITS"] else 0)
    out = num_classes * n_subclasses * out_bytes
    moved = {"h": h * groups, "logits": logits * groups, "out": out, "map": map_read / rows_per_read}
    return {**moved, "rows_per_map_read": rows_per_read, "dram": moved["h"] + moved["logits"] + out,
            "l2": moved["h"] + moved["logits"] + moved["map"], "floor": h + logits + out}


def targets_instructions_per_row(facts: Dict[str, object], v: dict, d: int, num_classes: int,
                                  n: int = TARGETS_ROWS) -> float:
    """Thread instructions per row from the SASS: a row tile issues the row-tile loop's body once
    (the longest loop), plus the streamed reduction loop (the one with the MMAs) D / BLOCK_D - 1 more
    times; the code outside the row-tile loop runs once per program. Each of the program's
    ``num_warps * 32`` threads issues them all, for BLOCK_N rows, in each class group's program."""
    c = v["constexprs"]
    loops = facts["loops"]
    tile_loop = loops[-1]["instructions"]
    reduction = [loop for loop in loops[:-1] if loop["mma"]]
    per_tile = tile_loop + (reduction[0]["instructions"] * (-(-d // c["BLOCK_D"]) - 1) if reduction else 0)
    tiles_per_program = -(-n // c["BLOCK_N"]) / targets_row_programs(n, c["BLOCK_N"])
    per_tile += (facts["sass"] - tile_loop) / tiles_per_program
    return per_tile * v["config"].num_warps * 32 / c["BLOCK_N"] * targets_groups(v, num_classes)


def targets_flops_per_row(v: dict, d: int, num_classes: int) -> Tuple[str, float]:
    """(tensor-core type, FLOP per row): every launched group's columns and its head, each map part."""
    c = v["constexprs"]
    kind, passes = MMA_PASSES[v["dtype"]]
    map_rows = -(-d // c["BLOCK_D"]) * c["BLOCK_D"]
    columns = targets_groups(v, num_classes) * (c["C_BLOCK"] * c["S_PAD"] + (0 if c["HAS_LOGITS"] else 16))
    return kind, 2.0 * map_rows * columns * passes


def targets_model(facts: Dict[str, object], v: dict, d: int, num_classes: int, n_subclasses: int,
                  device: str) -> Dict[str, float]:
    """Modelled time per row (s) of the HBM's traffic, the reads from L2 (``L2_READ_RATE``),
    instruction issue and tensor-core issue, and the slowest of the four over the floor (the floor's
    bytes at the device's bandwidth)."""
    moved = targets_bytes_per_row(v, d, num_classes, n_subclasses)
    kind, flops = targets_flops_per_row(v, d, num_classes)
    times = {"memory": moved["dram"] / BANDWIDTH[device], "l2": moved["l2"] / L2_READ_RATE,
             "issue": targets_instructions_per_row(facts, v, d, num_classes) / THREAD_INSTRUCTIONS_PER_S,
             "mma": flops / (SMS * MMA_FLOP_PER_SM_CLOCK[kind] * CLOCK_HZ)}
    floor = moved["floor"] / BANDWIDTH[device]
    return {**times, "floor": floor, "over_floor": max(times.values()) / floor}


def targets_cost_variants():
    """(index into targets.VARIANTS, C, S) of the launches at the cost shapes (``targets.plan``)."""
    from . import targets

    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    out = []
    for (c, s), name, with_head in itertools.product(targets.COST_SHAPES, dtypes, (True, False)):
        p = targets.plan(targets.COST_D, c, s, dtypes[name], with_head)
        out.append((targets.variant_index(name, "aligned", p, c, s), c, s))
    return out


def targets_table(facts_json: str) -> str:
    """The Markdown table of docs/benchmarks.md: each cost-shape launch on sm_90, its bytes per row
    against the floor, SASS per element, and the modelled time over the floor on H100 and H200 (each
    term: the HBM's bytes, the reads from L2, issue, tensor cores)."""
    from . import targets

    with open(facts_json) as f:
        facts = json.load(f)
    by_case = {(r["case"][1], r["case"][2]): r for r in facts["cases"]  # in the variant's own dtypes
               if r["case"][0] == "targets" and not r["case"][3]}
    lines = ["| Triton | dtype | K (C x S) | logits | BLOCK_N x BLOCK_D, warps | rows / map read | bytes / row: "
             "h + map + logits + out (floor) | SASS / element | H100: HBM, L2, issue, MMA / floor | H200 |",
             "|" + "---|" * 10]
    d = targets.COST_D
    for i, c, s in targets_cost_variants():
        row = by_case.get((i, 90))
        if row is None or row["error"]:
            continue
        v = targets.VARIANTS[i]
        ce = v["constexprs"]
        b = targets_bytes_per_row(v, d, c, s)
        per_element = targets_instructions_per_row(row["facts"], v, d, c) / (c * s)
        cells = []
        for device in ("H100", "H200"):
            m = targets_model(row["facts"], v, d, c, s, device)
            terms = ", ".join(f"{m[term] / m['floor']:.2f}" for term in ("memory", "l2", "issue", "mma"))
            cells.append(f"{terms} → **{m['over_floor']:.2f}**")
        logits = "yes" if ce["HAS_LOGITS"] else "no"
        lines.append(f"| {facts['triton']} | {v['dtype']} | {c * s} ({c} x {s}) | {logits} "
                     f"| {ce['BLOCK_N']} x {ce['BLOCK_D']}, {v['config'].num_warps} "
                     f"| {b['rows_per_map_read']:,.0f} "
                     f"| {b['h']:.0f} + {b['map']:.0f} + {b['logits']:.0f} + {b['out']:.0f}"
                     f" ({b['floor']:.0f}) | {per_element:.0f} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- KD targets

def kd_targets_model(facts: Dict[str, object], v: dict) -> Dict[str, float]:
    """Modelled time over the floor per device of a ``kd_targets`` variant: it moves the floor's bytes
    (each logit read once, each target written once), so only issue and MUFU can put it over."""
    per = per_element(facts, v["constexprs"]["BLOCK_N"], v["C"], v["num_warps"])
    floor = DTYPE_BYTES[v["dtype"]] + DTYPE_BYTES[v["out_dtype"]]
    return {device: modelled_ratio(per["instructions"], per["mufu"], floor, floor, device) for device in BANDWIDTH}


# The L1's tag stage looks up about one 128-byte line a clock per SM (a lead, like the figures above): a
# warp instruction whose threads' addresses span more lines takes that many clocks of it.
LINE_BYTES, L1_LINES_PER_CLOCK = 128, 1


def _piece_lines(c: int, itemsize: int, first: int, chunks: int, block_n: int, lanes: int, layout, row0: int):
    """(lines, elements) of one piece's warp instructions (``chunks`` chunks of ``lanes`` columns from
    column ``first``) in the program whose first row is ``row0``; slot = chunk * block_n + row, as
    ``kd_targets._chunks``. An instruction is one vector of registers of every thread: ``layout`` =
    (sizePerThread, threadsPerWarp) of one warp, a thread's values along a row."""
    (_, per_thread), (rows_a_warp, lanes_a_warp) = layout
    vector = min(per_thread, 16 // itemsize) if c % 16 == 0 else 1  # the JIT's alignment: 16-byte rows only
    lines = elements = 0
    for slot0 in range(0, chunks * block_n, rows_a_warp):
        for lane0 in range(0, lanes, per_thread * lanes_a_warp):
            for v0 in range(0, per_thread, vector):
                touched = set()
                for slot in range(slot0, min(slot0 + rows_a_warp, chunks * block_n)):
                    row, col0 = row0 + slot % block_n, first + (slot // block_n) * lanes
                    for thread in range(lanes_a_warp):
                        start = lane0 + thread * per_thread + v0
                        for lane in range(start, min(start + vector, lanes)):
                            if col0 + lane < c:
                                touched.add((row * c + col0 + lane) * itemsize // LINE_BYTES)
                                elements += 1
                lines += len(touched)
    return lines, elements


def kd_lines_per_element(v: dict, layouts, itemsize: int) -> float:
    """128-byte lines a ``kd_targets`` launch's loads (or stores) touch per element, rows of C contiguous
    values, over enough programs that the rows' offsets within a line come round; ``layouts``: each
    piece's (``aot.kd_memory_layouts``)."""
    from . import kd_targets

    ce, c = v["constexprs"], v["C"]
    pieces = kd_targets.pieces(ce)
    assert len(layouts) == len(pieces), (layouts, pieces)  # a memory op in another layout kind was missed
    period = LINE_BYTES // math.gcd(c * itemsize, LINE_BYTES)
    lines = elements = 0
    for program in range(-(-period // ce["BLOCK_N"])):
        for (first, chunks), layout in zip(pieces, layouts):
            got = _piece_lines(c, itemsize, first, chunks, ce["BLOCK_N"], ce["LANES"], layout, program * ce["BLOCK_N"])
            lines, elements = lines + got[0], elements + got[1]
    return lines / elements


def kd_lines_model(v: dict, load_layouts, store_layouts) -> Dict[str, float]:
    """Per device, the time the lines of a ``kd_targets`` launch's loads and stores take at
    L1_LINES_PER_CLOCK a clock per SM, over the floor (each logit read once, each target written once)."""
    lines = (kd_lines_per_element(v, load_layouts, DTYPE_BYTES[v["dtype"]])
             + kd_lines_per_element(v, store_layouts, DTYPE_BYTES[v["out_dtype"]]))
    seconds = lines / (SMS * CLOCK_HZ * L1_LINES_PER_CLOCK)
    floor = DTYPE_BYTES[v["dtype"]] + DTYPE_BYTES[v["out_dtype"]]
    return {device: seconds / (floor / bandwidth) for device, bandwidth in BANDWIDTH.items()}


def kd_targets_table(facts_json: str) -> str:
    """Markdown rows of every compiled ``kd_targets`` variant: SASS and MUFU per element, modelled/floor."""
    from . import kd_targets

    with open(facts_json) as f:
        data = json.load(f)
    lines = ["| Triton | arch | logits → out | C | BLOCK_N | SASS / element | MUFU / element | H100 | H200 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in data["cases"]:
        op, i, arch, _ = row["case"]
        if op != "kd" or row["facts"] is None or kd_targets.VARIANTS[i]["rows"] != kd_targets.ROWS:
            continue
        v = kd_targets.VARIANTS[i]
        per = per_element(row["facts"], v["constexprs"]["BLOCK_N"], v["C"], v["num_warps"])
        ratio = kd_targets_model(row["facts"], v)
        lines.append(f"| {data['triton']} | sm_{arch} | {v['dtype']} → {v['out_dtype']} | {v['C']} | "
                     f"{v['constexprs']['BLOCK_N']} | {per['instructions']:.1f} | {per['mufu']:.2f} | "
                     f"{ratio['H100']:.2f} | {ratio['H200']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="The loss and targets kernels' modelled cost from aot's facts (no GPU).")
    p.add_argument("facts", help="JSON written by python -m lelp_fast.kernels.triton.aot --out")
    args = p.parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "1"  # the launcher's bytes are counted on CPU tensors: the interpreter runs it
    bf16, _ = loss_step_bytes(torch.bfloat16, backend="triton")
    fp32, _ = loss_step_bytes(torch.float32, backend="triton")
    for name, floor in (("bf16", 6), ("fp32", 12)):
        b = budgets(floor)
        print(f"budgets at the {name} floor ({floor} B/element): " + "; ".join(
            f"{d} {v['instructions']:.0f} instructions, {v['mufu']:.1f} MUFU" for d, v in b.items()))
    print(f"launcher bytes per element: bf16 {bf16:.1f}, fp32 {fp32:.1f}")
    print(loss_table(args.facts, bf16, fp32))
    weighted = {name: weighted_loss_bytes(dtype) for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    print("subclass weight λ = 0.1, launcher bytes per element (one pass, two calls): " + "; ".join(
        f"{name} {one:.1f}, {two:.1f}" for name, (one, two) in weighted.items()))
    print(weighted_loss_table(args.facts, weighted["bf16"][0], weighted["fp32"][0]))
    print("forward only (no gradient wanted), launcher bytes per element: " + "; ".join(
        f"{name} {loss_step_bytes(dtype, backend='triton', forward_only=True)[0]:.1f}"
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))))
    print(forward_only_table(args.facts))
    print(targets_table(args.facts))
    print(kd_targets_table(args.facts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
