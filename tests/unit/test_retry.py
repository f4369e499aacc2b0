"""Backoff grows exponentially, is capped, and jitters below its bound."""

from __future__ import annotations

import random

import pytest

from agent.retry import Backoff
from agent.settings import SettingsError


def test_bounds_double_then_cap() -> None:
    backoff = Backoff(base_s=0.5, cap_s=3.0, jitter=False)
    assert [backoff.delay(n) for n in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_huge_attempt_numbers_stay_capped() -> None:
    assert Backoff(base_s=1.0, cap_s=10.0, jitter=False).delay(10_000) == 10.0


def test_jittered_delays_stay_below_the_bound_and_vary() -> None:
    backoff = Backoff(base_s=1.0, cap_s=8.0, rng=random.Random(7))
    delays = [backoff.delay(3) for _ in range(50)]
    assert all(0.0 <= d <= 8.0 for d in delays)
    assert len(set(delays)) > 1


@pytest.mark.parametrize(("base", "cap"), [(0.0, 1.0), (2.0, 1.0), (-1.0, 5.0)])
def test_invalid_bounds_are_refused(base: float, cap: float) -> None:
    with pytest.raises(SettingsError, match="backoff"):
        Backoff(base_s=base, cap_s=cap)
