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


def targets_unsupported(num_classes: int, n_subclasses: int, with_head: bool) -> Optional[str]:
    """Why the Triton targets kernel cannot take this shape, or None."""
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
