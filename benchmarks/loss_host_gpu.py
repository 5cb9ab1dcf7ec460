"""How much of the loss's measured time is the host's, on a GPU: fwd+bwd timed as bench_gpu.py does
(CUDA events around calls, the host launching as it goes) and as CUDA-graph replays (no host work),
for the Triton backend and torch.compile of the plain formula, with the host's time per call.

The H200's first run (2026-12-04) measured the fused loss at 4 M rows at 0.75 ms for K = 16 and
1.18 ms for K = 2, 8-100x the copy floor, 0.5-1.0x torch.compile's speed: this says whether that
is the kernels or the launches.
    python benchmarks/loss_host_gpu.py [--profile]   # --profile: where the host time goes (cProfile)
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time

import torch
import triton.testing

from bench_gpu import eager_loss
from lelp_fast.ops import distill_loss

SIZES = [(4 << 20, 2, 1), (4 << 20, 2, 8), (4 << 20, 8, 16)]


def host_ms(fn, calls=50):
    """Milliseconds of host time per call: calls launched back to back, before the device catches up."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) * 1e3 / calls
    torch.cuda.synchronize()
    return host


def loss_steps(n, c, s, compiled=None) -> dict:
    """{way: one fwd+bwd step} over the same bf16 inputs of n rows and K = c * s: the Triton loss, and
    ``compiled`` (torch.compile of the plain formula) if given."""
    st = torch.randn(n, c * s, device="cuda").bfloat16().requires_grad_(True)
    log_t = torch.log_softmax(torch.randn(n, c * s, device="cuda"), -1).bfloat16()
    y = torch.randint(0, c, (n,), device="cuda")
    ways = {"triton": lambda: distill_loss(st, log_t, y, num_classes=c, n_subclasses=s, tau=2.0, alpha=0.1,
                                           backend="triton", check_inputs=False)}
    if compiled is not None:
        ways["compile"] = lambda: compiled(st, log_t, y, c, s)

    def step_of(loss_fn):
        def step():
            st.grad = None
            loss_fn().backward()
        return step

    return {name: step_of(loss_fn) for name, loss_fn in ways.items()}


def profile(n=1 << 20, c=2, s=8, calls=100):
    """The host's time in one fwd+bwd of the Triton loss at K = 16, by function (cProfile)."""
    step = loss_steps(n, c, s)["triton"]
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        step()
    profiler.disable()
    torch.cuda.synchronize()
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", action="store_true", help="profile the host's time instead of the table")
    if p.parse_args().profile:
        profile()
        return 0
    print("| K | rows | dtype | way | events ms | graph ms | host ms per call |")
    print("|---|---|---|---|---|---|---|", flush=True)
    compiled = torch.compile(eager_loss, dynamic=False)
    for n, c, s in SIZES:
        for name, step in loss_steps(n, c, s, compiled).items():
            events = triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
            try:
                graph = triton.testing.do_bench_cudagraph(step, rep=100, return_mode="median")
                graph = f"{graph:.3f}"
            except Exception as exc:  # noqa: BLE001 - a step that cannot be captured says so
                graph = f"{type(exc).__name__}: {str(exc)[:50]}"
            print(f"| {c * s} | {n} | bf16 | {name} fwd+bwd | {events:.3f} | {graph} | {host_ms(step):.3f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
