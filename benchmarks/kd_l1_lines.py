"""The 128-byte lines a vanilla KD targets launch's loads and stores touch, per element, and the time
they take at one line a clock per SM (the L1's tag stage) against the floor (``cost.kd_lines_model``;
the gate ``tests/test_triton_aot.py::test_kd_targets_lines_within_budget`` holds a launch of each tail
kind to it), beside the SASS model's issue and MUFU (``cost.kd_targets_model``). Each launch is
compiled for sm_90 with the installed Triton, its load and store layouts read from the TTGIR
(``aot.kd_memory_layouts``).

    python benchmarks/kd_l1_lines.py 17 33 65:32 65 80:32 80 81 81:16   (the default)

``C:LANES`` compiles the launch of C classes on LANES lanes (with its tail) instead of the launcher's.
"""

from __future__ import annotations

import sys

from lelp_fast.kernels.triton import aot, cost, kd_targets


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
            v = dict(dtype=z, out_dtype=out, C=int(c), num_warps=kd_targets.NUM_WARPS, constexprs=ce)
            loads, stores = aot.kd_memory_layouts(v)
            lines = (cost.kd_lines_per_element(v, loads, cost.DTYPE_BYTES[z]),
                     cost.kd_lines_per_element(v, stores, cost.DTYPE_BYTES[out]))
            l1 = cost.kd_lines_model(v, loads, stores)
            facts = aot.kernel_facts(aot.compile_kernel(kd_targets.kd_targets_kernel, kd_targets.signature(v), ce,
                                                        kd_targets.launch_values(v), 90, v["num_warps"], 3))
            model = cost.kd_targets_model(facts, v)
            print(f"| {c} | {z} → {out} | {ce['LANES']}, {ce['TAIL']} | {lines[0]:.3f}, {lines[1]:.3f} | "
                  f"{l1['H100']:.2f}, {l1['H200']:.2f} | {model['H100']:.2f}, {model['H200']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:] or ["17", "33", "65:32", "65", "80:32", "80", "81", "81:16"]))
