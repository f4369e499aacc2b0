"""When to renew a workload certificate, and how long to wait after a failed renewal.

Pure arithmetic over times; the certificate manager owns the clock and the timers. Renewal starts at
half life, so a CA outage as long as half a certificate's lifetime costs nothing: the old certificate
stays in use while retries continue. Retries use the project-wide `agent.retry.Backoff`.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from agent.retry import Backoff


def renewal_time(not_before: datetime, not_after: datetime) -> datetime:
    """The moment a certificate valid from `not_before` to `not_after` should be renewed: half life."""
    return not_before + (not_after - not_before) / 2


def time_until_renewal(not_before: datetime, not_after: datetime, now: datetime) -> timedelta:
    """How long from `now` until the renewal is due; zero when it is due already."""
    return max(renewal_time(not_before, not_after) - now, timedelta(0))


def renewal_retry_delay(
    backoff: Backoff, attempt: int, *, not_after: datetime | None, now: datetime
) -> float:
    """Seconds to wait before retry number `attempt` (0 for the first) of a failed renewal.

    The backoff's delay, but never more than a quarter of the time the certificate in use has left
    (`not_after`; None when there is none yet), so several attempts happen before it expires. That cap
    never goes below the backoff's base delay, or the last moments before expiry would become a busy
    loop. Once the certificate has expired, the plain backoff applies.
    """
    delay = backoff.delay(attempt)
    if not_after is None:
        return delay
    remaining = (not_after - now).total_seconds()
    return min(delay, max(remaining / 4, backoff.base_s)) if remaining > 0 else delay
