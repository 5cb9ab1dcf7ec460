"""Paired differences against a baseline: the interval the tuner and the run report state."""

import math

import pytest

from lelp_fast.paired import format_difference, paired_interval


def test_the_interval_is_the_paired_student_t_one():
    # diffs 0.01, 0.03, 0.02: mean 0.02, sd 0.01, t(0.975, 2) = 4.302653 -> half 0.0248414
    stats = paired_interval([0.91, 0.93, 0.92], [0.90, 0.90, 0.90])
    assert stats["mean"] == pytest.approx(0.02) and stats["sd"] == pytest.approx(0.01)
    half = 4.302652729911275 * 0.01 / math.sqrt(3)
    assert stats["interval"] == pytest.approx([0.02 - half, 0.02 + half])
    assert stats["wins"] == 3 and stats["seeds"] == 3


def test_one_seed_has_no_interval_and_lengths_must_match():
    assert paired_interval([0.9], [0.8])["interval"] is None
    assert "no interval" in format_difference(paired_interval([0.9], [0.8]))
    with pytest.raises(ValueError, match="one value per seed"):
        paired_interval([0.9, 0.8], [0.8])
    with pytest.raises(ValueError, match="confidence"):
        paired_interval([0.9, 0.8], [0.8, 0.7], confidence=1.5)


def test_the_formatted_difference_says_points_interval_and_wins():
    text = format_difference(paired_interval([0.91, 0.93, 0.92], [0.90, 0.90, 0.90]))
    assert text.startswith("+2.00 points (95 % interval -0.48 to +4.48, sd 1.00, 3/3 seeds won)")
