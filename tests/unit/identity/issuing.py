"""An in-process CA and a manual clock for tests of the certificate manager and of what uses it.

The issuer is real signing (`validate_csr` + `sign_leaf` on a throwaway root); only the clock is
manual, so renewal timing is driven step by step instead of waited for.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

from agent.identity.ca import sign_leaf
from agent.identity.certificates import TrustBundle, certificates_to_pem
from agent.identity.csr import CsrAccepted, validate_csr
from agent.identity.manager import Issued, IssueDenied, IssueFailed, IssueOutcome
from agent.identity.spiffe import SpiffeId
from agent.identity.testing import EphemeralCa

T0 = datetime(2030, 1, 1, tzinfo=UTC)
LIFETIME = timedelta(hours=1)
"""Lifetime of every certificate the in-process issuer signs."""


class ManualClock:
    """Wall-clock time that moves only when the test says so; sleepers wake as it passes them."""

    def __init__(self, start: datetime) -> None:
        self._now = start
        self._order = itertools.count()
        self._sleepers: list[tuple[datetime, int, asyncio.Future[None]]] = []

    def now(self) -> datetime:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        wake = asyncio.get_running_loop().create_future()
        bisect.insort(self._sleepers, (self._now + timedelta(seconds=seconds), next(self._order), wake))
        await wake

    async def advance(self, delta: timedelta) -> None:
        """Moves time forward, waking each sleeper in order and letting it run before the next."""
        target = self._now + delta
        while self._sleepers and self._sleepers[0][0] <= target:
            due, _, wake = self._sleepers.pop(0)
            self._now = max(self._now, due)
            if not wake.done():
                wake.set_result(None)
            await settle()
        self._now = target
        await settle()


async def settle() -> None:
    """Lets every runnable task run until all wait again (the issuer answers without real I/O)."""
    for _ in range(50):
        await asyncio.sleep(0)


class InProcessIssuer:
    """A CA in this process: validates each request and signs it with `sign_leaf` at the clock's time."""

    def __init__(self, ca: EphemeralCa, clock: ManualClock) -> None:
        self.ca = ca
        self.clock = clock
        self.available = True
        self.denied: dict[SpiffeId, str] = {}
        self.requests: list[tuple[SpiffeId, datetime]] = []
        self.impersonate: SpiffeId | None = None

    async def issue(self, spiffe_id: SpiffeId, csr_pem: bytes, *, timeout: float) -> IssueOutcome:
        self.requests.append((spiffe_id, self.clock.now()))
        if not self.available:
            return IssueFailed(f"the CA did not answer within {timeout:g}s")
        if spiffe_id in self.denied:
            return IssueDenied(self.denied[spiffe_id])
        validation = validate_csr(csr_pem, "cluster.local")
        assert isinstance(validation, CsrAccepted)
        assert validation.spiffe_id == spiffe_id
        leaf = sign_leaf(
            self.ca.authority,
            self.impersonate or spiffe_id,
            validation.public_key,
            now=self.clock.now(),
            lifetime=LIFETIME,
        )
        return Issued(certificates_to_pem((leaf,)))

    async def trust_bundles(self) -> AsyncIterator[TrustBundle]:
        yield self.ca.bundle
        await asyncio.Event().wait()
