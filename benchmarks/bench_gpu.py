"""One command to validate and time every GPU op: checks against the fp64 reference, then the tables.

Run on a GPU: python benchmarks/bench_gpu.py [--quick] [--csv docs/bench_gpu.csv] [--check NAMES]
Without a GPU (logic only, tiny sizes, Triton interpreter):
    TRITON_INTERPRET=1 python benchmarks/bench_gpu.py --device cpu --quick
``--check loss`` runs that check alone and exits (``--check none``: the tables alone);
benchmarks/gpu_session.sh runs each check in its own process so one crash cannot hide the rest.

1. Checks: targets and loss (5 divergences, precomputed / M teachers / online from one or three
   teachers, 3 dtypes, odd shapes, K up to 512, logits ±1e4, and on a GPU tensors past 2^31
   elements) on each GPU backend against the fp64 reference, outputs poisoned with NaN first. A
   check that raises counts as failed and the others still run; any failure is printed and the
   script exits non-zero after the tables.
2. Targets: triton / cuda / eager / torch.compile / "compile bf16" (the map cast to bf16, what a
   user writes), floor = read the embeddings + write the targets at the copy bandwidth measured
   in the same run.
   Vanilla KD targets (one subclass, the teacher's logits given: ``log_softmax(z / tau)``, no
   embeddings read): the same columns against ``log_softmax(z.float() / tau)``, floor = read the
   logits + write the targets.
3. Loss fwd+bwd (KL, tau = 2, alpha = 0.1): triton / cuda / eager / torch.compile, floor = read s
   and t + write the gradient at copy bandwidth.
4. Jobs from an fp16 .npy in the page cache (1.6 M x 768, 2 classes, S = 8; --quick: 20 k x 64):
   fit (exact and Nystrom) and offline targets (fp16 .npy shards) on the GPU and on this host's
   CPUs, next to a plain read of the file (fit floor) and read + write of the outputs (offline floor).
Times are medians of ``triton.testing.do_bench`` (CUDA events) on a GPU, of a wall clock on CPU.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import os
import sys
import time

import torch
import torch.nn.functional as F

from _timing import read_once
from bench_fit import make_dataset  # class-structured fp16 embeddings and labels on disk
from bench_targets import eager_targets  # the plain fp32 formula, as a user writes it

from lelp_fast import LELPProjector, __version__, generate_targets, reference
from lelp_fast.ops import _dispatch, distill_loss, lelp_targets

DIVERGENCES = reference.DIVERGENCES


def bench(fn, device) -> float:
    """Median milliseconds."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def targets_unsupported(backend, c, s, with_head):
    """Why ``backend`` does not take this targets shape (a forced call would raise), or None."""
    from lelp_fast.kernels.triton import limits

    if backend == "triton":
        return limits.targets_unsupported(c, s, with_head)
    return _dispatch.cuda_unsupported(c, s) if backend == "cuda" else None


def gpu_backends(device):
    return [b for b in ("triton", "cuda") if _dispatch.available(b, torch.device(device))]


# ----------------------------------------------------------------------------------- checks

def check_targets(device, failures):
    # (65, 64, 2, 64): a 130-column map, 3 column groups of the CUDA tile; (17, 40, 2, 256): K = 512,
    # wider than the tile (CUDA's row kernel; Triton refuses S > 128 and is skipped); (9, 24, 10, 16)
    # and (7, 24, 3, 100): 3 Triton class groups per row tile each; (1000, 768, 2, 8): the tables'
    # K = 16 at d = 768; (40000, 64, 4, 4): more 128-row tiles (313) than a persistent grid has
    # programs (2 per SM). The CUDA tile's resident form (sm_90) takes every case of up to 256 columns
    # whose map fits: (40000, 64, 4, 4) runs 313 tiles of 128 rows on 132
    # blocks, so its copies run on across tiles; d = 77 and 5 take the rows without 16-byte loads;
    # (300, 768, 16, 8) and (1, 768, 16, 8): the tables' K = 128, whose map fits no block's shared memory,
    # so the CUDA tile streams it: 128-row tiles in 16 bits (144 and 128 columns, 2 x 5 fragments a
    # warp), 64 in fp32
    cases = [(1, 5, 2, 1), (333, 77, 3, 5), (1000, 768, 2, 8), (257, 130, 8, 16), (65, 64, 2, 64), (129, 40, 16, 4),
             (17, 40, 2, 256), (9, 24, 10, 16), (7, 24, 3, 100), (40000, 64, 4, 4), (300, 768, 16, 8),
             (1, 768, 16, 8),
             (3001, 16, 300, 1), (4099, 8, 17, 1), (1037, 8, 65, 1)]  # S = 1 with given logits: vanilla KD's
    # kernel (65 classes: rows on 16 lanes, kd_targets.lanes)
    for backend in gpu_backends(device):
        for i, (n, d, c, s) in enumerate(cases):
            for dtype, with_head in targets_check_cases(i):
                if not SHARD.takes_next():
                    continue
                why = targets_unsupported(backend, c, s, with_head)
                if why:  # auto sends it to the next backend (tests/test_dispatch.py)
                    print(f"  skip targets {backend} C={c} S={s} head={with_head}: {why}")
                    continue
                g = torch.Generator().manual_seed(n + d + s)
                k = c * s
                h = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
                j = k + (c if with_head else 0)
                w = torch.randn(d, j, generator=g, dtype=torch.float64) / d**0.5
                b = torch.randn(j, generator=g, dtype=torch.float64)
                z = None if with_head else (torch.randn(n, c, generator=g, dtype=torch.float64) * 1e4).to(dtype)
                proj = h.double() @ w.float().double() + b.float().double()
                want = reference.log_targets(proj[:, :k], proj[:, k:] if z is None else z.double(), s, 0.7, 1.3)
                out = torch.full((n, k), float("nan"), device=device)
                got = lelp_targets(h.to(device), w.float().to(device), b.float().to(device), c, s,
                                   teacher_logits=None if z is None else z.to(device), beta=0.7, tau=1.3,
                                   backend=backend, out=out, check_inputs=False)
                err = (got.cpu().double() - want).abs().max().item()
                tol = 2e-4 + 1e-4 * want.abs().max().item()
                if not torch.isfinite(got).all() or err > tol:
                    failures.append(f"targets {backend} {dtype} n={n} d={d} C={c} S={s} head={with_head}: "
                                    f"max error {err:.3g} > {tol:.3g}")


TARGETS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Shard:
    """``--shard I/N``: this process runs every N-th case of the targets and loss checks, from the
    I-th. On a GPU the loss check compiles about 300 kernels one after another (1-2 s each), so
    gpu_session.sh runs the shards side by side, in processes sharing Triton's cache."""

    def __init__(self, spec: str = "0/1"):
        index, _, count = spec.partition("/")
        if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
            raise SystemExit(f"--shard takes I/N with 0 <= I < N, got {spec!r}")
        self.index, self.count, self.seen = int(index), int(count), -1

    def takes_next(self) -> bool:
        self.seen += 1
        return self.seen % self.count == self.index


SHARD = Shard()


def check_cases(seed, *axes):
    """Every combination of the axes on a GPU; under the Triton interpreter one, turning with the
    check shape's index ``seed``, so that the shapes take every value of each axis between them
    (the products took 205 s (loss) and 55 s (targets) of the CPU logic run; tests/test_triton.py
    covers them there)."""
    from lelp_fast.kernels.triton import interpreting

    if interpreting():
        return [tuple(axis[seed % len(axis)] for axis in axes)]
    return list(itertools.product(*axes))


def targets_check_cases(seed):
    """(dtype, with the head) of a targets check shape: 6 on a GPU, 1 interpreted."""
    return check_cases(seed, TARGETS_DTYPES, (True, False))


def loss_check_cases(dtypes, seed):
    """(dtype, divergence, teachers) of a loss check shape: 30 on a GPU, 1 interpreted."""
    return check_cases(seed, dtypes, DIVERGENCES, (None, 3))


def check_loss(device, failures):
    tol = {torch.float32: 5e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
    for backend in gpu_backends(device):
        for i, (n, c, s) in enumerate([(1, 2, 1), (37, 2, 8), (1031, 5, 8), (9, 3, 13), (64, 2, 256), (33, 4, 10)]):
            for dtype, div, m in loss_check_cases(list(tol), i):
                if not SHARD.takes_next():
                    continue
                g = torch.Generator().manual_seed(n * s + c)
                k = c * s
                student = (torch.randn(n, k, generator=g, dtype=torch.float64) * 3).to(dtype)
                shape = (n, k) if m is None else (n, m, k)
                log_t = torch.log_softmax(torch.randn(*shape, generator=g, dtype=torch.float64) * 3, -1)
                w = None if m is None else torch.softmax(torch.randn(n, m, generator=g), 1)
                y = torch.randint(0, c, (n,), generator=g)
                x = student.to(device, copy=True).requires_grad_(True)

                def call():
                    return distill_loss(x, log_t.float().to(device), y.to(device), num_classes=c, n_subclasses=s,
                                        divergence=div, tau=1.7, alpha=0.3, backend=backend,
                                        teacher_weights=None if w is None else w.to(device))

                loss = call()
                loss.backward()
                with torch.no_grad():  # forward only (no gradient computed or written): the same loss
                    e_forward = abs(call().item() - loss.item())
                ref_t = log_t.float().double()
                if m is not None:
                    ref_t = torch.log((w.double().unsqueeze(-1) * ref_t.exp()).sum(1))
                s64 = student.detach().double().requires_grad_(True)
                want = reference.distillation_loss(s64, ref_t, y, num_classes=c, n_subclasses=s,
                                                   divergence_kind=div, tau=1.7, alpha=0.3)
                want.backward()
                e_loss = abs(loss.item() - want.item())
                e_grad = (x.grad.double().cpu() - s64.grad).abs().max().item()
                scale = max(1.0, abs(want.item()))
                if not (e_loss <= tol[dtype] * scale and e_grad <= 2 * tol[dtype] and e_forward <= 1e-5 * scale):
                    failures.append(f"loss {backend} {dtype} {div} n={n} C={c} S={s} M={m}: "
                                    f"errors {e_loss:.3g} / {e_grad:.3g}, forward only {e_forward:.3g}")


def check_online_loss(device, failures):
    """Targets computed inside the loss from one teacher (head or given logits) and from three mixed."""
    c, s, n = 3, 5, 301
    k = c * s
    g = torch.Generator().manual_seed(5)
    teachers = []
    for i, d in enumerate([19, 40, 768]):
        j = k + c if i == 0 else k
        emb = torch.randn(n, d, generator=g).bfloat16()
        z = None if i == 0 else torch.randn(n, c, generator=g) * 2
        teachers.append((emb, torch.randn(d, j, generator=g) / d**0.5, torch.randn(j, generator=g), z, 0.5 + i))
    weights = torch.softmax(torch.randn(n, 3, generator=g), 1)
    y = torch.randint(0, c, (n,), generator=g)
    student = torch.randn(n, k, generator=g) * 3
    per = []
    for emb, w, b, z, beta in teachers:
        proj = emb.double() @ w.double() + b.double()
        per.append(reference.log_targets(proj[:, :k], proj[:, k:] if z is None else z.double(), s, beta=beta, tau=1.5))
    mixed = torch.log((weights.double().unsqueeze(-1) * torch.stack(per, 1).exp()).sum(1))
    for backend in gpu_backends(device):
        for name, chosen, mix, log_t in [("head", teachers[:1], None, per[0]), ("logits", teachers[1:2], None, per[1]),
                                         ("M=3", teachers, weights, mixed)]:
            x = student.to(device, copy=True).requires_grad_(True)
            loss = distill_loss(x, None, y.to(device), num_classes=c, n_subclasses=s, tau=1.5, alpha=0.2,
                                embeddings=[t[0].to(device) for t in chosen],
                                fused_weight=[t[1].to(device) for t in chosen],
                                fused_bias=[t[2].to(device) for t in chosen],
                                teacher_logits=[None if t[3] is None else t[3].to(device) for t in chosen],
                                beta=[t[4] for t in chosen], teacher_weights=None if mix is None else mix.to(device),
                                backend=backend)
            loss.backward()
            s64 = student.double().requires_grad_(True)
            want = reference.distillation_loss(s64, log_t, y, num_classes=c, n_subclasses=s, tau=1.5, alpha=0.2)
            want.backward()
            e_loss, e_grad = abs(loss.item() - want.item()), (x.grad.double().cpu() - s64.grad).abs().max().item()
            if not (e_loss <= 1e-4 * max(1.0, abs(want.item())) and e_grad <= 1e-4):
                failures.append(f"online loss {backend} {name}: errors {e_loss:.3g} / {e_grad:.3g}")


def check_past_2_31(device, failures, n=(1 << 27) + 3):
    """Targets and loss over more than 2^31 elements (a 32-bit index would wrap): the last rows."""
    c, s, d = 2, 8, 8
    k = c * s
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(n, d, device=device, generator=g).bfloat16()
    w = torch.randn(d, k + c, device=device, generator=g) / d**0.5
    b = torch.randn(k + c, device=device, generator=g)
    tail = slice(n - 5, n)
    proj = h[tail].double() @ w.double() + b.double()
    want_t = reference.log_targets(proj[:, :k], proj[:, k:], s, 0.7, 1.3)
    for backend in gpu_backends(device):
        out = torch.full((n, k), float("nan"), device=device)  # 2^31 + 48 elements
        lelp_targets(h, w, b, c, s, beta=0.7, tau=1.3, backend=backend, out=out, check_inputs=False)
        err = (out[tail].double() - want_t).abs().max().item()
        if not err <= 2e-4:
            failures.append(f"targets {backend} past 2^31 elements: last rows' error {err:.3g}")
    out = None
    # vanilla KD (S = 1, 17 given logits a row: kd_targets' kernel), 2^31 + 51 elements
    z = torch.randn(n, 17, device=device, generator=g).bfloat16()
    want_kd = torch.log_softmax(z[tail].double() / 1.3, -1)
    for backend in gpu_backends(device):
        out = torch.full((n, 17), float("nan"), device=device)
        lelp_targets(h, w[:, :17], b[:17], 17, 1, teacher_logits=z, tau=1.3, backend=backend, out=out,
                     check_inputs=False)
        err = (out[tail].double() - want_kd).abs().max().item()
        if not err <= 2e-5:
            failures.append(f"KD targets {backend} past 2^31 elements: last rows' error {err:.3g}")
    out = h = z = None
    student = torch.randn(n, k, device=device, generator=g).bfloat16()
    log_t = torch.log_softmax(torch.randn(n, k, device=device, generator=g), -1).bfloat16()
    y = torch.randint(0, c, (n,), device=device, generator=g)
    s64 = student[tail].double().requires_grad_(True)
    want = reference.distillation_loss(s64, log_t[tail].double(), y[tail], num_classes=c, n_subclasses=s,
                                       tau=2.0, alpha=0.1, reduction="none")
    (want_grad,) = torch.autograd.grad(want.sum(), s64)
    for backend in gpu_backends(device):
        x = student.detach().requires_grad_(True)
        loss = distill_loss(x, log_t, y, num_classes=c, n_subclasses=s, tau=2.0, alpha=0.1, reduction="none",
                            backend=backend, check_inputs=False)
        (grad,) = torch.autograd.grad(loss[tail].sum(), x)
        e_loss = (loss[tail].double() - want.to(device)).abs().max().item()
        e_grad = (grad[tail].double() - want_grad.to(device)).abs().max().item()
        if not (e_loss <= 2e-2 and e_grad <= 4e-2):
            failures.append(f"loss {backend} past 2^31 elements: last rows' errors {e_loss:.3g} / {e_grad:.3g}")


CHECKS = ("targets", "loss", "online_loss", "past_2_31")


def run_checks(device, names):
    """Runs the named checks; prints and returns the failures. An exception in a check (a launch
    that fails) is a failure of that check, and the other checks still run."""
    failures = []
    for name in names:
        if name == "none":
            continue
        if name not in CHECKS:
            raise SystemExit(f"unknown check {name!r}; choose from {CHECKS}")
        # past 2^31 elements on a GPU (about 20 GB of its memory); elsewhere the same check on 1000 rows
        extra = [1000] if name == "past_2_31" and device != "cuda" else []
        try:
            globals()[f"check_{name}"](device, failures, *extra)
        except Exception as exc:  # noqa: BLE001 - reported with the check's name, the rest go on
            failures.append(f"{name}: raised {type(exc).__name__}: {exc}")
    print(f"checks {','.join(names)}: {len(failures)} failure(s)", flush=True)
    for f in failures:
        print("  FAIL", f)
    return failures


# ----------------------------------------------------------------------------------- timings

def eager_targets_bf16(h, weight, bias, num_classes, s):
    k = num_classes * s
    proj = (h @ weight.to(h.dtype)).float() + bias
    log_class = F.log_softmax(proj[:, k:], dim=-1)
    log_sub = F.log_softmax(proj[:, :k].reshape(-1, num_classes, s), dim=-1)
    return (log_class.unsqueeze(-1) + log_sub).reshape(-1, k)


def eager_loss(s, log_t, y, num_classes, n_sub, tau=2.0, alpha=0.1):
    log_q = F.log_softmax(s.float() / tau, -1)
    kl = (log_t.float().exp() * (log_t.float() - log_q)).sum(-1)
    pooled = torch.logsumexp(s.float().reshape(-1, num_classes, n_sub), -1)
    return (tau * tau * kl).mean() + alpha * F.cross_entropy(pooled, y)


def copy_bandwidth(device, nbytes) -> float:
    """Bytes per ms of a device copy (read + write counted)."""
    a = torch.empty(nbytes // 4, device=device)
    b = torch.empty_like(a)
    return 2 * nbytes / bench(lambda: b.copy_(a), device)


def time_targets(device, sizes, rows, bw):
    for n, d, c, s in sizes:
        k = c * s
        for dtype in (torch.bfloat16, torch.float16):
            h = torch.randn(n, d, device=device).to(dtype)
            w = torch.randn(d, k + c, device=device) / d**0.5
            b = torch.randn(k + c, device=device)
            out = torch.empty(n, k, device=device)
            floor = (h.numel() * h.element_size() + out.numel() * 4) / bw
            row = dict(op="targets", shape=f"{n}x{d},K={k}", dtype=str(dtype).split(".")[1], floor=floor)
            for backend in gpu_backends(device):
                row[backend] = bench(lambda: lelp_targets(h, w, b, c, s, backend=backend, out=out,
                                                          check_inputs=False), device)
            row["eager"] = bench(lambda: eager_targets(h, w, b, c, s), device)
            if device == "cuda":
                torch._dynamo.reset()
                comp = torch.compile(eager_targets, dynamic=False)
                row["compile"] = bench(lambda: comp(h, w, b, c, s), device)
                comp16 = torch.compile(eager_targets_bf16, dynamic=False)
                row["compile bf16"] = bench(lambda: comp16(h, w, b, c, s), device)
            rows.append(row)
            h = out = None  # free the inputs before the next size is allocated


def eager_kd_targets(z, tau):
    return F.log_softmax(z.float() / tau, dim=-1)


def time_kd_targets(device, sizes, rows, bw, tau=2.0):
    """Vanilla KD targets (S = 1 with given logits): the embeddings are not read (8 columns stand in)."""
    for n, c in sizes:
        z = (torch.randn(n, c, device=device) * 3).to(torch.bfloat16)
        h = torch.empty(n, 8, device=device, dtype=torch.bfloat16)
        w, b = torch.zeros(8, c, device=device), torch.zeros(c, device=device)
        out = torch.empty(n, c, device=device)
        floor = (z.numel() * z.element_size() + out.numel() * 4) / bw
        row = dict(op="kd targets", shape=f"{n},C={c}", dtype="bfloat16", floor=floor)
        if "triton" in gpu_backends(device):  # the CUDA backend takes torch's log_softmax here (the eager column)
            row["triton"] = bench(lambda: lelp_targets(h, w, b, c, 1, teacher_logits=z, tau=tau, backend="triton",
                                                       out=out, check_inputs=False), device)
        row["eager"] = bench(lambda: eager_kd_targets(z, tau), device)
        if device == "cuda":
            torch._dynamo.reset()
            comp = torch.compile(eager_kd_targets, dynamic=False)
            row["compile"] = bench(lambda: comp(z, tau), device)
        rows.append(row)
        z = h = out = None


def time_loss(device, sizes, rows, bw):
    for n, c, s, dtype in sizes:
        k = c * s
        st = torch.randn(n, k, device=device).to(dtype).requires_grad_(True)
        log_t = torch.log_softmax(torch.randn(n, k, device=device), -1).to(dtype)
        y = torch.randint(0, c, (n,), device=device)
        floor = (2 * st.numel() * st.element_size() + st.numel() * st.element_size()) / bw
        row = dict(op="loss fwd+bwd", shape=f"{n},K={k}", dtype=str(dtype).split(".")[1], floor=floor)

        def run(backend):
            st.grad = None
            distill_loss(st, log_t, y, num_classes=c, n_subclasses=s, tau=2.0, alpha=0.1, backend=backend,
                         check_inputs=False).backward()

        for backend in gpu_backends(device):
            row[backend] = bench(lambda: run(backend), device)

        def run_eager(fn):
            st.grad = None
            fn(st, log_t, y, c, s).backward()

        row["eager"] = bench(lambda: run_eager(eager_loss), device)
        if device == "cuda":
            torch._dynamo.reset()
            comp = torch.compile(eager_loss, dynamic=False)
            row["compile"] = bench(lambda: run_eager(comp), device)
        rows.append(row)


def plain_read(path: str) -> float:
    """Seconds to read the file once into one reused buffer (the fit's floor)."""
    t0 = time.perf_counter()
    read_once(path, 64 << 20)
    return time.perf_counter() - t0


def plain_write(directory: str, nbytes: int) -> float:
    """Seconds to write nbytes to a new file in 64 MiB blocks (the offline job's extra floor)."""
    block = bytes(64 << 20)
    path = os.path.join(directory, "write_floor.bin")
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for start in range(0, nbytes, len(block)):
            f.write(block[: min(len(block), nbytes - start)])
    seconds = time.perf_counter() - t0
    os.unlink(path)
    return seconds


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def time_jobs(device, n, d, workdir, jobs):
    """Fit and offline targets on `device` and on the CPUs, from a file in the page cache."""
    import shutil

    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, f"jobs_{n}x{d}.npy")
    make_dataset(path, n, d, 2)
    labels = path + ".labels.npy"
    plain_read(path)  # into the page cache
    read = min(plain_read(path) for _ in range(2))
    head = torch.randn(2, d, generator=torch.Generator().manual_seed(0)) / d**0.5
    devices = [device, "cpu"] if device != "cpu" else ["cpu"]
    projector = None
    for dev in devices:
        for method in ("exact", "nystrom"):
            p = LELPProjector(8, method=method, rotate=False)
            seconds = timed(lambda: p.fit(path, labels, head_weight=head, head_bias=torch.zeros(2), device=dev))
            jobs.append(dict(job=f"fit {method}", device=dev, seconds=seconds, floor=read))
            projector = projector or p
    out_bytes = n * projector.n_outputs * 2
    floor = read + plain_write(workdir, out_bytes)
    for dev in devices:
        out = os.path.join(workdir, f"targets_{dev}")
        # twice: the first call in the process compiles the targets kernel (Triton's JIT, seconds on a
        # GPU), the second is the job's own time (the H200's first run timed only the first: 5.4 s)
        for job in ("offline targets, first call", "offline targets"):
            shutil.rmtree(out, ignore_errors=True)
            seconds = timed(lambda: generate_targets(projector, path, out, dtype="float16", device=dev))
            jobs.append(dict(job=job, device=dev, seconds=seconds, floor=floor))
        shutil.rmtree(out, ignore_errors=True)
    print(f"jobs: {n} x {d} fp16 ({os.path.getsize(path) / 1e9:.2f} GB) in the page cache; plain read {read:.3f} s")


def print_jobs(jobs):
    print("| job | device | seconds | floor (s) | / floor |")
    print("|---|---|---|---|---|")
    for j in jobs:
        print(f"| {j['job']} | {j['device']} | {j['seconds']:.3f} | {j['floor']:.3f} | {j['seconds'] / j['floor']:.2f} |")


COLUMNS = ["op", "shape", "dtype", "floor", "triton", "cuda", "eager", "compile", "compile bf16"]


def print_table_head():
    print("| " + " | ".join(COLUMNS) + " | best / floor | compile / best |")
    print("|" + "---|" * (len(COLUMNS) + 2), flush=True)


def print_table_row(r):
    ours = min([r[b] for b in ("triton", "cuda") if b in r] or [float("nan")])
    peer = min([r[b] for b in ("compile", "compile bf16") if b in r] or [float("nan")])
    cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "—")) for c in COLUMNS]
    print("| " + " | ".join(cells) + f" | {ours / r['floor']:.2f} | {peer / ours:.2f} |", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="small sizes (a logic check, or a fast GPU smoke run)")
    p.add_argument("--csv", default=None, help="append the rows to this CSV file (the jobs to <name>_jobs.csv)")
    p.add_argument("--workdir", default="/tmp/lelp_bench_gpu", help="where the jobs' data file and outputs go")
    p.add_argument("--check", default=None,
                   help=f"run only these checks (comma-separated, of {','.join(CHECKS)}; 'none': tables only)")
    p.add_argument("--shard", default="0/1", help="I/N: every N-th case of the targets and loss checks, from the I-th")
    p.add_argument("--parts", default="targets,loss,jobs", help="which tables (comma-separated): targets, loss, jobs")
    args = p.parse_args()
    global SHARD
    SHARD = Shard(args.shard)
    parts = set(args.parts.split(","))
    if not parts or parts - {"targets", "loss", "jobs"}:
        raise SystemExit(f"--parts takes targets, loss and jobs, comma-separated, got {args.parts!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no GPU: run with --device cpu under TRITON_INTERPRET=1 for a logic check", file=sys.stderr)
        return 2
    from lelp_fast.kernels.triton import interpreting

    if interpreting():  # TRITON_INTERPRET as Triton reads it (1/true/on/yes/y)
        from lelp_fast.kernels.triton.interpreter_fix import patch_interpreter

        patch_interpreter()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (interpreter)"
    print(f"device: {name}; torch {torch.__version__}; lelp_fast {__version__}; "
          f"{datetime.date.today().isoformat()}", flush=True)

    failures = run_checks(args.device, CHECKS if args.check is None else args.check.split(","))
    if args.check not in (None, "none"):  # the checks alone (gpu_session.sh runs each in its own process)
        return 1 if failures else 0

    big = not args.quick and args.device == "cuda"
    if parts & {"targets", "loss"}:
        kernel_tables(args.device, big, RowWriter(args.csv, name), parts)
    if "jobs" in parts:
        jobs = []
        time_jobs(args.device, *((1_600_000, 768) if big else (20_000, 64)), args.workdir, jobs)
        print_jobs(jobs)
        if args.csv:
            write_jobs_csv(os.path.splitext(args.csv)[0] + "_jobs.csv", jobs, name)
    return 1 if failures else 0


def kernel_tables(device, big, rows, parts):
    """The targets and loss tables (those in ``parts``), each row printed (and written) as soon as it
    is measured, so a run stopped by its time limit keeps what it measured."""
    bw = copy_bandwidth(device, (1 << 30) if big else (1 << 22))
    print(f"copy bandwidth: {bw / 1e9:.3f} TB/s (read + write)" if device == "cuda"
          else f"copy bandwidth: {bw / 1e6:.2f} GB/s", flush=True)
    t_sizes = ([(4 << 20, 768, 2, 8), (4 << 20, 768, 5, 8), (4 << 20, 768, 8, 16), (1 << 20, 4096, 2, 8),
                (1 << 20, 4096, 5, 8), (1 << 20, 4096, 8, 16)] if big else [(4096, 64, 2, 8), (1000, 40, 5, 8)])
    l_sizes = ([(4 << 20, c, s, dt) for (c, s) in ((2, 8), (2, 20), (8, 16), (16, 32), (2, 1))
                for dt in (torch.bfloat16, torch.float32)]
               if big else [(4096, 2, 8, torch.bfloat16), (999, 2, 20, torch.float32)])
    print_table_head()
    if "targets" in parts:
        time_targets(device, t_sizes, rows, bw)
        kd_sizes = [(4 << 20, 2), (4 << 20, 10), (4 << 20, 65), (4 << 20, 300)] if big else [(4096, 10), (999, 300)]
        time_kd_targets(device, kd_sizes, rows, bw)
    if "loss" in parts:
        time_loss(device, l_sizes, rows, bw)


class RowWriter(list):
    """The measured rows: each printed as a table line, and appended to the CSV file if one is named."""

    def __init__(self, path, device_name):
        super().__init__()
        self.path, self.device_name = path, device_name

    def append(self, row):
        super().append(row)
        print_table_row(row)
        if not self.path:
            return
        fresh = not os.path.exists(self.path)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS + ["device", "torch", "lelp_fast", "date"])
            if fresh:
                writer.writeheader()
            writer.writerow({**{c: row.get(c, "") for c in COLUMNS}, "device": self.device_name,
                             "torch": torch.__version__, "lelp_fast": __version__,
                             "date": datetime.date.today().isoformat()})


def write_jobs_csv(path, jobs, device_name):
    fresh = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["job", "device", "seconds", "floor", "gpu", "torch", "lelp_fast", "date"])
        if fresh:
            writer.writeheader()
        for j in jobs:
            writer.writerow({**j, "gpu": device_name, "torch": torch.__version__, "lelp_fast": __version__,
                             "date": datetime.date.today().isoformat()})


if __name__ == "__main__":
    sys.exit(main())
