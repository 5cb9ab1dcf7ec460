"""What shapes the Triton kernels take, importable without triton (the dispatcher asks first)."""

from __future__ import annotations

from typing import Optional

MAX_HEAD_CLASSES = 16  # the targets kernel's head dot is one 16-column tensor-core tile
MAX_SUBCLASS_COLUMNS = 512  # C_PAD * S_PAD, taken by up to 8 programs per row tile (one per class group)
# Columns one targets program holds (whole classes): 64 rows x 256 fp32 accumulator columns spilled
# (tests/test_triton_aot.py), so a class of more than 128 (padded) subclasses goes to the next backend.
MAX_SUBCLASSES_PER_PROGRAM = 128
MAX_LOSS_K = 512  # the loss kernel holds a whole row (next_pow2(K)) in registers
# The subclass weight λ ≠ 1 in the loss kernel's one pass (rows as class tiles, each thread holding
# whole classes: the per-class work is done once per class, not per element and class): up to this
# many classes, the "few classes" the library targets. tests/test_triton_aot.py compiles and gates
# one launch per tile (loss.weighted_tile), so the limit bounds that count; above it, and at one
# class (no tile is compiled for it), the launcher keeps two calls of the λ = 1 kernel (ops/loss.py).
MAX_FUSED_WEIGHTED_CLASSES = 16
# The row counts the gates compile each Triton launch at (tests/test_triton_aot.py): the first is the
# one the cost model reads (4 M rows, a multiple of 16); then one of each other kind Triton's JIT
# specialises a row count apart, a constant 1 (a batch of one row) and no multiple of 16 (most last
# batches).
ROW_COUNTS = (4 << 20, 333, 1)
# Rows a launch takes: past 2^31 the JIT would take N as a 64-bit integer, a kernel no gate compiles;
# more rows take several launches, each on 2^30 rows' boundary (their pointers stay on 16 bytes).
ROW_CHUNK = 1 << 30


def inverse_temperature(t: float) -> float:
    """1/t (τ or β) as a kernel's fp32 argument, at least fp32's smallest normal: above t of about 1e45
    1/t is 0 in fp32 (above 8.5e37 subnormal, which a GPU's FTZ arithmetic takes as 0), and a padded
    slot's -inf times 0 is NaN. At 2^-126 a row's (x - max) / t is about 0 (under 1e-8 where its values
    spread by less than 1e30): the uniform classes or subclasses that t -> inf tends to."""
    return max(1.0 / t, 2.0**-126)


def row_pieces(n: int, chunk: int = ROW_CHUNK):
    """(start, stop) of each launch over ``n`` rows: at most ``chunk`` each, and a count of no multiple of
    16 only in a last piece of fewer than 16 rows. So the kernels the JIT compiles for such counts, and
    for one row, run at most 15 rows; every larger launch is the one the cost gates model (a multiple of
    16 rows; ``ROW_COUNTS[0]``)."""
    assert chunk % 16 == 0, chunk  # every piece starts on 16 rows: its pointers stay on 16 bytes
    pieces = []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        body = start + (stop - start) // 16 * 16
        pieces += [(a, b) for a, b in ((start, body), (body, stop)) if b > a]
    return pieces


def jit_kind(x: int) -> str:
    """How Triton's JIT specialises a run-time integer: a constant 1, a multiple of 16 (a divisibility
    hint), or neither."""
    return "1" if x == 1 else "16" if x % 16 == 0 else "-"


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def padded_grid(num_classes: int, n_subclasses: int):
    """(C_PAD, S_PAD): powers of two with C_PAD * S_PAD >= 16 (a full tensor-core tile)."""
    s_pad = _next_pow2(n_subclasses)
    c_pad = max(_next_pow2(num_classes), 16 // min(s_pad, 16))
    return c_pad, s_pad


def vanilla_kd(n_subclasses: int, has_logits: bool) -> bool:
    """Whether targets are vanilla KD: one subclass per class with the teacher's logits given. Their
    subclass log-softmax is over one value (0), so ``log t = log_softmax(z / τ)`` and no backend reads
    the embeddings (the Triton one launches ``kd_targets``' kernel)."""
    return n_subclasses == 1 and has_logits


def targets_unsupported(num_classes: int, n_subclasses: int, with_head: bool, d: Optional[int] = None) -> Optional[str]:
    """Why the Triton targets kernel cannot take this shape (with embeddings of width ``d``), or None.
    Vanilla KD (``vanilla_kd``) reads no embeddings: its ``d`` does not matter."""
    if d == 1 and not vanilla_kd(n_subclasses, not with_head):  # the JIT would make d a constant: a kernel
        # no gate compiles (tests/test_triton_aot.py)
        return "it takes embeddings of at least 2 features (got d = 1)"
    if with_head and num_classes > MAX_HEAD_CLASSES:
        return f"its head dot takes at most {MAX_HEAD_CLASSES} classes (got C={num_classes})"
    c_pad, s_pad = padded_grid(num_classes, n_subclasses)
    if s_pad > MAX_SUBCLASSES_PER_PROGRAM:
        return (f"a program holds whole classes of at most {MAX_SUBCLASSES_PER_PROGRAM} (padded) subclasses "
                f"(got S={n_subclasses})")
    if c_pad * s_pad > MAX_SUBCLASS_COLUMNS:
        return f"it takes a padded C*S grid of at most {MAX_SUBCLASS_COLUMNS} columns (got {c_pad}x{s_pad})"
    return None


def loss_unsupported(num_classes: int, n_subclasses: int) -> Optional[str]:
    """Why the Triton loss kernel cannot take this shape, or None."""
    k = num_classes * n_subclasses
    return f"it takes K = C*S <= {MAX_LOSS_K} (got {k})" if k > MAX_LOSS_K else None


def weighted_loss_unfused(num_classes: int, n_subclasses: int, divergence: int = 0) -> Optional[str]:
    """Why the loss kernel cannot take the subclass weight λ ≠ 1 in its own pass, or None."""
    if divergence != 0:
        return "the subclass weight splits KL only"
    if num_classes < 2:
        return "its one-pass tiles start at two classes"
    if num_classes > MAX_FUSED_WEIGHTED_CLASSES:
        return (f"it takes the subclass weight in one pass for C <= {MAX_FUSED_WEIGHTED_CLASSES} classes "
                f"(got {num_classes})")
    return None
