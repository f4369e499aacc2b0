"""The certificate manager holds a certificate per wanted identity, renews at half life, keeps the old
certificate through a CA outage, drops identities no longer hosted, and answers the data plane with a
certificate or a typed failure.

The issuer is real in-process signing (`validate_csr` + `sign_leaf` on a throwaway root); only the
clock is manual, so renewal timing is driven step by step instead of waited for.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta

import pytest

from agent.identity.certificates import TrustBundle, WorkloadCertificate
from agent.identity.manager import (
    BundleUnavailable,
    CertificateManager,
    NotHosted,
    NotReady,
)
from agent.identity.spiffe import SpiffeId
from agent.identity.testing import EphemeralCa
from agent.retry import Backoff
from tests.unit.identity.issuing import LIFETIME, T0, InProcessIssuer, ManualClock, settle

pytestmark = pytest.mark.timeout(30)

CART = SpiffeId("cluster.local", "shop", "cart")
DB = SpiffeId("cluster.local", "shop", "db")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def issuer(ca: EphemeralCa, clock: ManualClock) -> InProcessIssuer:
    return InProcessIssuer(ca, clock)


ExpiryLog = list[tuple[SpiffeId, datetime | None]]


@pytest.fixture
def expiries() -> ExpiryLog:
    return []


FailureLog = list[tuple[SpiffeId, str]]


@pytest.fixture
def failures() -> FailureLog:
    return []


@pytest.fixture
async def manager(
    issuer: InProcessIssuer, clock: ManualClock, expiries: ExpiryLog, failures: FailureLog
) -> AsyncIterator[CertificateManager]:
    backoff = Backoff(base_s=1.0, cap_s=60.0, jitter=False)
    recorder: Callable[[SpiffeId, datetime | None], None] = lambda i, t: expiries.append((i, t))  # noqa: E731
    async with CertificateManager(
        issuer,
        backoff=backoff,
        clock=clock,
        on_expiry=recorder,
        on_failure=lambda i, reason: failures.append((i, reason)),
    ) as running:
        yield running


async def certificate(manager: CertificateManager, spiffe_id: SpiffeId) -> WorkloadCertificate:
    result = await manager.credential(spiffe_id, timeout=0)
    assert isinstance(result, WorkloadCertificate), result
    return result


async def test_wanted_identity_gets_a_certificate_for_exactly_that_identity(
    manager: CertificateManager, issuer: InProcessIssuer, expiries: ExpiryLog
) -> None:
    manager.set_wanted([CART])
    await settle()
    cert = await certificate(manager, CART)
    assert cert.spiffe_id == CART
    assert cert.not_after == T0 + LIFETIME
    assert issuer.requests == [(CART, T0)]
    assert expiries == [(CART, T0 + LIFETIME)]


async def test_credential_waits_for_a_certificate_still_being_issued(manager: CertificateManager) -> None:
    manager.set_wanted([CART])
    result = await manager.credential(CART, timeout=5)
    assert isinstance(result, WorkloadCertificate)
    assert result.spiffe_id == CART


async def test_identity_not_hosted_is_refused_at_once(manager: CertificateManager) -> None:
    manager.set_wanted([CART])
    await settle()
    result = await manager.credential(DB, timeout=5)
    assert result == NotHosted(DB)
    assert "not hosted on this node" in result.reason


async def test_denied_identity_fails_with_the_cas_reason(
    manager: CertificateManager, issuer: InProcessIssuer, failures: FailureLog
) -> None:
    issuer.denied[DB] = "no pod with service account shop/db is scheduled on node node-1"
    manager.set_wanted([DB])
    await settle()
    result = await manager.credential(DB, timeout=0)
    assert isinstance(result, NotReady)
    assert "no certificate for spiffe://cluster.local/ns/shop/sa/db has been issued yet" in result.reason
    assert "the CA denied the request: no pod with service account shop/db" in result.reason
    assert manager.status()[DB].failures == 1
    assert failures == [(DB, f"the CA denied the request: {issuer.denied[DB]}")]


async def test_renewal_happens_at_half_life_with_a_fresh_key(
    manager: CertificateManager, issuer: InProcessIssuer, clock: ManualClock, expiries: ExpiryLog
) -> None:
    manager.set_wanted([CART])
    await settle()
    first = await certificate(manager, CART)
    half_life = (first.not_after - first.not_before) / 2

    await clock.advance(half_life - (clock.now() - first.not_before) - timedelta(seconds=1))
    assert await certificate(manager, CART) is first

    await clock.advance(timedelta(seconds=1))
    second = await certificate(manager, CART)
    assert second is not first
    assert second.leaf.serial_number != first.leaf.serial_number
    assert second.key.public_key() != first.key.public_key()
    assert second.not_after > first.not_after
    assert [e for _, e in expiries] == [first.not_after, second.not_after]


async def test_ca_outage_keeps_the_old_certificate_and_recovers(
    manager: CertificateManager, issuer: InProcessIssuer, clock: ManualClock
) -> None:
    manager.set_wanted([CART])
    await settle()
    first = await certificate(manager, CART)
    issuer.available = False

    await clock.advance(LIFETIME * 0.6)
    assert await certificate(manager, CART) is first
    status = manager.status()[CART]
    assert status.failures >= 1
    assert status.last_error == "the CA did not answer within 30s"

    attempts_before = len(issuer.requests)
    await clock.advance(LIFETIME * 0.3)
    assert len(issuer.requests) > attempts_before, "retries continue during the outage"
    assert await certificate(manager, CART) is first

    issuer.available = True
    await clock.advance(LIFETIME * 0.05)
    renewed = await certificate(manager, CART)
    assert renewed is not first
    assert manager.status()[CART].failures == 0


async def test_retries_stay_several_before_expiry(
    manager: CertificateManager, issuer: InProcessIssuer, clock: ManualClock
) -> None:
    manager.set_wanted([CART])
    await settle()
    first = await certificate(manager, CART)
    issuer.available = False
    await clock.advance(first.not_after - clock.now() - timedelta(seconds=1))
    last_minute = [t for _, t in issuer.requests if t >= first.not_after - timedelta(minutes=1)]
    assert len(last_minute) >= 3, "the plain backoff (cap 60 s) would try at most once in the last minute"


async def test_expired_certificate_is_never_served(
    manager: CertificateManager, issuer: InProcessIssuer, clock: ManualClock
) -> None:
    manager.set_wanted([CART])
    await settle()
    first = await certificate(manager, CART)
    issuer.available = False
    await clock.advance(first.not_after - clock.now())
    result = await manager.credential(CART, timeout=0)
    assert isinstance(result, NotReady)
    assert result.reason.startswith(f"the certificate for {CART} expired at {first.not_after.isoformat()}")
    assert "last attempt: the CA did not answer" in result.reason


async def test_dropped_identity_loses_its_certificate_and_expiry(
    manager: CertificateManager, issuer: InProcessIssuer, expiries: ExpiryLog
) -> None:
    manager.set_wanted([CART, DB])
    await settle()
    await certificate(manager, DB)
    manager.set_wanted([CART])
    await settle()
    assert await manager.credential(DB, timeout=0) == NotHosted(DB)
    assert set(manager.status()) == {CART}
    assert expiries[-1] == (DB, None)


async def test_a_waiter_learns_when_its_identity_is_dropped(
    manager: CertificateManager, issuer: InProcessIssuer
) -> None:
    issuer.available = False
    manager.set_wanted([CART])
    waiter = asyncio.create_task(manager.credential(CART, timeout=30))
    await settle()
    manager.set_wanted([])
    assert await waiter == NotHosted(CART)


async def test_certificate_for_another_identity_is_refused(
    manager: CertificateManager, issuer: InProcessIssuer
) -> None:
    issuer.impersonate = CART
    manager.set_wanted([DB])
    await settle()
    result = await manager.credential(DB, timeout=0)
    assert isinstance(result, NotReady)
    assert result.reason.endswith(f"last attempt: the CA issued a certificate for {CART}, not {DB}")


async def test_trust_bundle_comes_from_the_issuer(manager: CertificateManager, ca: EphemeralCa) -> None:
    assert await manager.trust_bundle(timeout=5) == ca.bundle


async def test_missing_trust_bundle_is_a_typed_failure(issuer: InProcessIssuer, clock: ManualClock) -> None:
    async def never() -> AsyncIterator[TrustBundle]:
        await asyncio.Event().wait()
        yield issuer.ca.bundle

    issuer.trust_bundles = never  # type: ignore[method-assign]
    async with CertificateManager(issuer, clock=clock) as manager:
        result = await manager.trust_bundle(timeout=0)
    assert isinstance(result, BundleUnavailable)
    assert "no trust bundle has been read" in result.reason


async def test_closing_stops_every_renewal(manager: CertificateManager) -> None:
    manager.set_wanted([CART, DB])
    await settle()
    await manager.aclose()
    assert manager.status() == {}
    renewals = [t for t in asyncio.all_tasks() if t.get_name().startswith("identity:")]
    assert renewals == []
