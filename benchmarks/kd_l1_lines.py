"""The 128-byte lines a vanilla KD targets launch's loads and stores touch, per element, and the time
they take at one line a clock per SM (the L1's tag stage) against the floor: what the SASS cost model
(``cost.kd_targets_model``: issue and MUFU) does not count. Each launch is compiled for sm_90 with the
installed Triton and its load and store layouts read from the TTGIR; a warp instruction is one vector
of registers of every thread, whose addresses are walked over rows of C contiguous logits.

    python benchmarks/kd_l1_lines.py 17 33 65:32 65 80:32 80 81 81:16   (the default)

``C:LANES`` compiles the launch of C classes on LANES lanes (with its tail) instead of the launcher's.
"""

from __future__ import annotations

import math
import re
import sys

from lelp_fast.kernels.triton import aot, cost, kd_targets

ITEMSIZE = {"bf16": 2, "fp32": 4}
LINE = 128


def compiled_layouts(variant: dict):
    """[(sizePerThread, threadsPerWarp) of each piece's load, in order], the same of the stores."""
    compiled = aot.compile_kernel(kd_targets.kd_targets_kernel, kd_targets.signature(variant), variant["constexprs"],
                                  kd_targets.launch_values(variant), 90, variant["num_warps"], 3)
    ttgir = compiled.asm["ttgir"]
    blocked = {m.group(1): m.group(2) for m in re.finditer(r"^(#blocked\d*) = #ttg.blocked<\{(.*)\}>", ttgir, re.M)}

    def layouts(op: str):
        out = []
        for name in re.findall(rf"tt.{op} [^\n]*, (#blocked\d*)> loc", ttgir):
            fields = {k: [int(x) for x in v.split(",")]
                      for k, v in re.findall(r"(\w+) = \[([\d, ]+)\]", blocked[name])}
            # the walk below assumes one warp and a thread's values along one row
            assert fields["warpsPerCTA"] == [1, 1] and fields["sizePerThread"][0] == 1, fields
            out.append((fields["sizePerThread"], fields["threadsPerWarp"]))
        return out
    return layouts("load"), layouts("store")


def piece_lines(c: int, itemsize: int, first: int, chunks: int, block_n: int, lanes: int, layout, row0: int):
    """(lines, elements) of one piece (``chunks`` chunks of ``lanes`` columns from ``first``) of the
    program whose first row is ``row0``: slot = chunk * block_n + row, as ``kd_targets._chunks``."""
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
                        for lane in range(lane0 + thread * per_thread + v0, lane0 + thread * per_thread + v0 + vector):
                            if lane < lanes and col0 + lane < c:
                                touched.add((row * c + col0 + lane) * itemsize // LINE)
                                elements += 1
                lines += len(touched)
    return lines, elements


def lines_per_element(variant: dict, layouts, itemsize: int) -> float:
    """Over enough programs that the rows' offsets within a line come round; ``layouts``: each piece's."""
    ce, c = variant["constexprs"], variant["C"]
    if ce["TAIL"]:
        pieces = [(0, ce["C_PAD"] // 2 // ce["LANES"]), (ce["C_PAD"] // 2, ce["TAIL"])]
    else:
        pieces = [(0, ce["C_PAD"] // ce["LANES"])]
    assert len(layouts) == len(pieces), (layouts, pieces)  # a memory op in another layout kind was missed
    period = LINE // math.gcd(c * itemsize, LINE)
    lines = elements = 0
    for program in range(-(-period // ce["BLOCK_N"])):
        for (first, chunks), layout in zip(pieces, layouts):
            got = piece_lines(c, itemsize, first, chunks, ce["BLOCK_N"], ce["LANES"], layout, program * ce["BLOCK_N"])
            lines, elements = lines + got[0], elements + got[1]
    return lines / elements


def main(argv) -> int:
    print("| C | logits → targets | LANES, TAIL | lines / element (load, store) | L1 time / floor: H100, H200 | "
          "issue, MUFU model / floor: H100, H200 |")
    print("|---|---|---|---|---|---|")
    for spec in argv:
        c, _, lanes = spec.partition(":")
        ce = dict(kd_targets.launch_constexprs(int(c)))
        if lanes:
            ce["LANES"] = int(lanes)
            ce["TAIL"] = kd_targets.tail(int(c), ce["C_PAD"], int(lanes))
        for z, out in (("bf16", "bf16"), ("bf16", "fp32"), ("fp32", "fp32")):
            variant = dict(dtype=z, out_dtype=out, C=int(c), num_warps=kd_targets.NUM_WARPS, constexprs=ce)
            load, store = compiled_layouts(variant)
            lines = (lines_per_element(variant, load, ITEMSIZE[z]), lines_per_element(variant, store, ITEMSIZE[out]))
            floor = ITEMSIZE[z] + ITEMSIZE[out]
            l1 = {d: sum(lines) / (cost.SMS * cost.CLOCK_HZ) / (floor / bw) for d, bw in cost.BANDWIDTH.items()}
            facts = aot.kernel_facts(aot.compile_kernel(kd_targets.kd_targets_kernel, kd_targets.signature(variant), ce,
                                                        kd_targets.launch_values(variant), 90, variant["num_warps"], 3))
            model = cost.kd_targets_model(facts, variant)
            print(f"| {c} | {z} → {out} | {ce['LANES']}, {ce['TAIL']} | {lines[0]:.3f}, {lines[1]:.3f} | "
                  f"{l1['H100']:.2f}, {l1['H200']:.2f} | {model['H100']:.2f}, {model['H200']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:] or ["17", "33", "65:32", "65", "80:32", "80", "81", "81:16"]))
