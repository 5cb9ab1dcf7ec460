"""Markdown tables from a pytest-benchmark JSON: one row per group (problem), the median of every
runner in it, and each lelp_fast runner's ratio against every peer and against the floor.

Run: pytest benchmarks/ --benchmark-only --benchmark-json bench.json && python benchmarks/bench_table.py bench.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def who(bench: dict) -> str:
    return bench["params"].get("who") or bench["name"].split("[")[-1].rstrip("]")


def table(results: dict) -> str:
    groups = defaultdict(dict)
    for bench in results["benchmarks"]:
        groups[bench["group"]][who(bench)] = bench["stats"]
    lines = []
    for group, runners in groups.items():
        ours = sorted(r for r in runners if r.startswith("lelp_fast"))
        peers = sorted(r for r in runners if not r.startswith("lelp_fast") and r != "floor")
        cells = [f"{r} {runners[r]['median'] * 1e3:.2f} ms (q20-q80 {_q(runners[r])})" for r in ours + peers]
        if "floor" in runners:
            cells.append(f"floor {runners['floor']['median'] * 1e3:.2f} ms")
        for r in ours:
            ratios = [f"{runners[p]['median'] / runners[r]['median']:.2f}x vs {p}" for p in peers]
            if "floor" in runners:
                ratios.append(f"{runners[r]['median'] / runners['floor']['median']:.2f}x the floor's time")
            cells.append(f"{r}: " + ", ".join(ratios))
        lines.append(f"| {group} | " + "; ".join(cells) + " |")
    machine = results.get("machine_info", {})
    head = (f"{machine.get('processor', '?')}, {machine.get('threads', '?')} threads, device "
            f"{machine.get('device', '?')}, torch {machine.get('torch', '?')}, lelp_fast "
            f"{machine.get('lelp_fast', '?')}, {results.get('datetime', '')}\n\n| problem | medians and ratios |\n|---|---|")
    return head + "\n" + "\n".join(lines)


def _q(stats: dict) -> str:
    """The 20 % and 80 % quantiles from the stored data when saved (--benchmark-save-data), else q1-q3."""
    data = sorted(stats.get("data") or [])
    if len(data) >= 5:
        return f"{data[len(data) // 5] * 1e3:.2f}-{data[(4 * len(data)) // 5] * 1e3:.2f}"
    return f"{stats['q1'] * 1e3:.2f}-{stats['q3'] * 1e3:.2f} (quartiles)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", help="the file --benchmark-json wrote")
    with open(parser.parse_args().json) as f:
        print(table(json.load(f)))


if __name__ == "__main__":
    main()
