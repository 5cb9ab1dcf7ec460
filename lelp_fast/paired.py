"""Paired comparisons: a method against a baseline trained on the same seeds (rows, order, init).

The seed-to-seed spread of either method is mostly shared by both, so the difference per seed is
far less noisy than either accuracy; its Student-t interval is what the library's decisions and
reports state.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence


def paired_interval(method: Sequence[float], baseline: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean, sample sd and two-sided ``confidence`` t-interval of ``method − baseline`` per seed,
    with the number of seeds won; the interval is None for a single seed (no spread to measure)."""
    if len(method) != len(baseline) or not method:
        raise ValueError(f"method and baseline must hold one value per seed each, got {len(method)} and "
                         f"{len(baseline)}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    diffs = [float(a) - float(b) for a, b in zip(method, baseline)]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else None
    interval: Optional[list] = None
    if sd is not None:
        from scipy.stats import t

        half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
        interval = [mean - half, mean + half]
    return {"mean": mean, "sd": sd, "interval": interval, "confidence": confidence, "seeds": n,
            "wins": sum(d > 0 for d in diffs), "diffs": diffs}


def format_difference(stats: dict, scale: float = 100.0, unit: str = "points") -> str:
    """``+1.23 points (95 % interval −0.10 to +2.56, sd 0.80, 4/5 seeds won)``."""
    text = f"{scale * stats['mean']:+.2f} {unit}"
    if stats["interval"] is None:
        return text + f" (1 seed: no interval, {stats['wins']}/1 won)"
    lo, hi = (scale * v for v in stats["interval"])
    return (text + f" ({100 * stats['confidence']:.0f} % interval {lo:+.2f} to {hi:+.2f}, "
            f"sd {scale * stats['sd']:.2f}, {stats['wins']}/{stats['seeds']} seeds won)")
