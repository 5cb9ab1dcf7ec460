"""Shared helpers for the benchmark scripts: timing (CPU wall clock, GPU events), the GPU A/B scripts' command
line, the read floor, an older build loaded beside the installed one."""

import argparse
import importlib.util
import os
import statistics
import time


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after ``warmup`` calls (compilation, caches)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(contenders: dict, rounds: int, repeats: int) -> dict:
    """{name: [median of ``repeats`` calls, one per round]}: every contender is called twice first
    (compilation), then each round times them all in turn, so that a slow spell of a shared machine
    falls on all of them."""
    for fn in contenders.values():
        fn(), fn()
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            times[name].append(median_seconds(fn, repeats, warmup=0))
    return times


def device_median_ms(fn, device: str) -> float:
    """Milliseconds of ``fn()`` on a GPU (the median of ``triton.testing.do_bench``, CUDA events); on
    another device ``fn`` runs once, untimed (the scripts' --quick logic checks), and this is NaN."""
    if device != "cuda":
        fn()
        return float("nan")
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def gpu_ab_arguments(doc: str, add=None) -> argparse.Namespace:
    """The command line of a GPU A/B script: --device, --quick (tiny sizes, for Triton's interpreter on
    a CPU), --csv, and what ``add(parser)`` adds; under the interpreter its bf16 fixes are applied."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if add:
        add(p)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes (the interpreter on a CPU)")
    p.add_argument("--csv")
    args = p.parse_args()
    from lelp_fast.kernels.triton import interpreting

    if interpreting():
        from lelp_fast.kernels.triton.interpreter_fix import patch_interpreter

        patch_interpreter()
    return args


def read_once(path: str, chunk_bytes: int) -> None:
    """Reads every byte of ``path`` once, chunk by chunk, into one reused buffer (the read floor)."""
    buf = bytearray(chunk_bytes)
    with open(path, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while f.readinto(buf):
            pass


def load_build(path: str, tag: str = "base"):
    """A copy of the extension at ``path`` loaded under another module name (same PyInit__C
    symbol), for A/B runs of an older build against the installed one."""
    spec = importlib.util.spec_from_file_location(f"lelp_ab_{tag}._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
