"""Renewal is due at half life; failed renewals back off, but never past the certificate's expiry."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from agent.identity.rotation import renewal_retry_delay, renewal_time, time_until_renewal
from agent.retry import Backoff

T0 = datetime(2030, 1, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)
SECOND = timedelta(seconds=1)


@pytest.mark.parametrize(
    ("lifetime", "due_after"),
    [(24 * HOUR, 12 * HOUR), (HOUR, 30 * timedelta(minutes=1)), (10 * SECOND, 5 * SECOND)],
)
def test_renewal_is_due_at_half_life(lifetime: timedelta, due_after: timedelta) -> None:
    assert renewal_time(T0, T0 + lifetime) == T0 + due_after


@pytest.mark.parametrize(
    ("now", "wait"),
    [(T0, 12 * HOUR), (T0 + 11 * HOUR, HOUR), (T0 + 12 * HOUR, timedelta(0)), (T0 + 30 * HOUR, timedelta(0))],
)
def test_time_until_renewal_counts_down_to_zero(now: datetime, wait: timedelta) -> None:
    assert time_until_renewal(T0, T0 + 24 * HOUR, now) == wait


UNJITTERED = Backoff(base_s=1.0, cap_s=300.0, jitter=False)


@pytest.mark.parametrize(
    ("attempt", "remaining", "delay"),
    [
        pytest.param(3, 24 * HOUR, 8.0, id="far from expiry: the backoff's delay"),
        pytest.param(20, 24 * HOUR, 300.0, id="far from expiry: the backoff's cap"),
        pytest.param(20, timedelta(minutes=8), 120.0, id="a quarter of what is left"),
        pytest.param(20, 2 * SECOND, 1.0, id="never capped below the backoff's base"),
        pytest.param(20, -HOUR, 300.0, id="expired: plain backoff"),
        pytest.param(20, None, 300.0, id="no certificate yet: plain backoff"),
    ],
)
def test_retry_delay_keeps_several_attempts_before_expiry(
    attempt: int, remaining: timedelta | None, delay: float
) -> None:
    not_after = None if remaining is None else T0 + remaining
    assert renewal_retry_delay(UNJITTERED, attempt, not_after=not_after, now=T0) == delay


def test_jittered_retry_delays_stay_under_both_caps() -> None:
    backoff = Backoff(base_s=1.0, cap_s=300.0, rng=random.Random(5))
    delays = [renewal_retry_delay(backoff, 20, not_after=T0 + 40 * SECOND, now=T0) for _ in range(50)]
    assert all(0.0 <= d <= 10.0 for d in delays)
    assert len(set(delays)) > 1
