"""Argument validation shared by the public API: clear errors that name the argument and the fix."""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Optional

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def as_tensor(name: str, x, *, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Converts a numpy array (memory-mapped too) or tensor to a tensor without copying when possible."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    elif isinstance(x, np.ndarray):
        with warnings.catch_warnings():  # read-only memmaps are fine: we never write to inputs
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(x)
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except Exception as exc:  # noqa: BLE001 - re-raised with the argument's name
            raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}") from exc
    if dtype is not None:
        t = t.to(dtype)
    return t


def check_matrix(name: str, x: torch.Tensor, *, cols: Optional[int] = None, cols_name: str = "") -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (rows x features) tensor, got shape {tuple(x.shape)}")
    if cols is not None and x.shape[1] != cols:
        what = f" ({cols_name})" if cols_name else ""
        raise ValueError(f"{name} must have {cols} columns{what}, got shape {tuple(x.shape)}")


def check_float(name: str, x: torch.Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32/float16/bfloat16/float64, got {x.dtype}; cast it with .float()")


def first_nonfinite_row(x: torch.Tensor) -> Optional[int]:
    """The first row holding NaN or Inf, or None.

    NaN and Inf survive a row sum, so one fast reduction finds the suspect rows (``isfinite`` over
    the whole tensor costs ~25x a sum on CPU); only those are checked element by element, which
    also clears rows whose finite values merely overflowed the sum.
    """
    if x.numel() == 0:
        return None
    rows = x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(-1, 1)
    sums = rows.sum(dim=1, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    suspect = torch.nonzero(~torch.isfinite(sums)).flatten()
    if suspect.numel() == 0:
        return None
    bad = suspect[~torch.isfinite(rows[suspect]).all(dim=1)]
    return int(bad[0]) if bad.numel() else None


class NonFiniteRowError(ValueError):
    """A row of ``name`` holds NaN or Inf (``row`` is its index, for callers that add an offset)."""

    def __init__(self, name: str, row: int):
        self.name, self.row = name, row
        super().__init__(f"{name} row {row} contains NaN or Inf; drop or repair non-finite rows before calling")


def check_finite(name: str, x: torch.Tensor, suspects: Optional[torch.Tensor] = None) -> None:
    """Raises :class:`NonFiniteRowError` naming the first row that holds NaN or Inf; with
    ``suspects`` (sorted row indices) only those rows are looked at."""
    row = first_nonfinite_row(x if suspects is None else x[suspects])
    if row is not None:
        raise NonFiniteRowError(name, row if suspects is None else int(suspects[row]))


def check_log_probabilities(name: str, x: torch.Tensor, suspects: Optional[torch.Tensor] = None) -> None:
    """Raises naming the first row of log-probabilities holding NaN or +Inf (-Inf is a probability
    of 0), or a value > 0: log-probabilities are <= 0, so such a row holds probabilities (or
    logits) passed where log-targets belong. With ``suspects`` (sorted row indices, e.g. flagged
    by the loss kernel's pass) only those rows are looked at."""
    if x.numel() == 0:
        return
    rows = x.reshape(x.shape[0], -1)
    if suspects is None:
        sums = rows.sum(dim=1, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        # Every entry <= 0 gives a row sum <= 0 (or -Inf): only rows failing that are looked at.
        suspect = torch.nonzero(~((sums <= 0) | torch.isneginf(sums))).flatten()
    else:
        suspect = suspects
    if suspect.numel() == 0:
        return
    bad = suspect[(torch.isnan(rows[suspect]) | torch.isposinf(rows[suspect])).any(dim=1)]
    if bad.numel():
        raise ValueError(f"{name} row {int(bad[0])} contains NaN or +Inf; log-targets must be log-probabilities")
    positive = suspect[(rows[suspect] > LOG_PROBABILITY_SLACK).any(dim=1)]
    if positive.numel():
        row = int(positive[0])
        raise ValueError(f"{name} row {row} holds {float(rows[row].max()):.4g} > 0: log-targets are log-probabilities "
                         "(<= 0); were probabilities passed? take their log first")


# Stored log-targets are rounded to fp16/bf16; a log-probability never rounds above 0, so any
# slack would do: this one only keeps the check from being about the last bit.
LOG_PROBABILITY_SLACK = 1e-3


def check_integer_labels(name: str, labels: torch.Tensor) -> None:
    """Float labels would be truncated silently by the kernels: refuse them (a dtype check, no sync)."""
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of class indices, got {labels.dtype}; "
                        f"convert exact integers with .long()")


def check_row_weights(name: str, weights: torch.Tensor, atol: float = 1e-3) -> None:
    """Per-row mixing weights: finite, >= 0, each row summing to 1 within ``atol``, or within their
    dtype's rounding (bf16 weights that summed to 1 before rounding are 2-4e-3 off); names the row."""
    w = weights.detach().to(torch.float64)
    if weights.is_floating_point():
        atol = max(atol, torch.finfo(weights.dtype).eps)
    checks = ((torch.isnan(w).any(1) | torch.isinf(w).any(1), "holds NaN or Inf"),
              ((w < 0).any(1), "has a weight that is not >= 0"),
              ((w.sum(1) - 1).abs() > atol, f"does not sum to 1 within {atol:g}"))
    for bad, what in checks:
        rows = torch.nonzero(bad).flatten()
        if rows.numel():
            row = int(rows[0])
            raise ValueError(f"{name} row {row} {what} ({w[row].tolist()}); weights must be >= 0 and sum to 1 "
                             "per row")


def _is_real(value) -> bool:
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) a Python float is a symbolic
    # float, which Dynamo compares (a guard) but cannot pass to math.isfinite (a graph break). NaN fails both.
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and -math.inf < value < math.inf


def _not_a_tensor(value) -> str:
    return " (a Python or numpy number, not a tensor: pass float(t))" if isinstance(value, torch.Tensor) else ""


def check_positive(name: str, value: float) -> None:
    """A finite number > 0 (numpy scalars too; bools, tensors, NaN and Inf refused)."""
    if not (_is_real(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number{_not_a_tensor(value)}, got {value!r}")


def check_nonnegative(name: str, value: float) -> None:
    """A finite number >= 0 (numpy scalars too; bools, tensors, NaN and Inf refused)."""
    if not (_is_real(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0{_not_a_tensor(value)}, got {value!r}")


def check_count(name: str, value, minimum: int = 1) -> int:
    """An integer >= ``minimum`` (numpy integers too; bools and floats refused), returned as ``int``.
    The one integer check behind the API, the CLI's argument types and the config."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def require_device(name: str, device) -> torch.device:
    """``device`` as a torch.device this machine has: a CUDA device on a machine (or a torch build)
    without one is named here, not by an assertion deep inside torch at the first copy."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{name} is {str(device)!r}, but torch.cuda.is_available() is False (torch "
                             f"{torch.__version__}); use 'cpu'")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"{name} is {str(device)!r}, but this machine has {count} CUDA device(s)")
    return parsed


def check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
