"""Static credentials hand out the certificates read from files, and say why when there is none."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from agent.identity.testing import EphemeralCa
from agent.node.credentials import StaticCredentials
from agent.proxy.credentials import CredentialUnavailable

CLIENT_ID = "spiffe://cluster.local/ns/demo/sa/client"


async def test_a_known_identity_gets_its_certificate_and_the_bundle_is_the_one_read() -> None:
    ca = EphemeralCa.create()
    certificate, bundle = ca.issue(CLIENT_ID), ca.bundle
    credentials = StaticCredentials(bundle, {CLIENT_ID: certificate})
    assert await credentials.credential(CLIENT_ID, 0.0) is certificate
    assert credentials.trust_bundle() is bundle


async def test_an_unknown_identity_is_unavailable_with_the_reason() -> None:
    ca = EphemeralCa.create()
    credentials = StaticCredentials(ca.bundle, {})
    assert await credentials.credential(CLIENT_ID, 1.0) == CredentialUnavailable(
        f"{CLIENT_ID}: the static configuration has no certificate for it"
    )


async def test_a_certificate_that_expired_since_it_was_read_is_unavailable() -> None:
    ca = EphemeralCa.create(now=datetime.now(UTC) - timedelta(days=2))
    expired = ca.issue_expired(CLIENT_ID)
    outcome = await StaticCredentials(ca.bundle, {CLIENT_ID: expired}).credential(CLIENT_ID, 0.0)
    assert isinstance(outcome, CredentialUnavailable)
    assert outcome.reason.startswith(f"{CLIENT_ID}: its certificate expired at ")


async def test_replace_swaps_certificates_and_bundle_whole() -> None:
    old_ca, new_ca = EphemeralCa.create(), EphemeralCa.create()
    credentials = StaticCredentials(old_ca.bundle, {CLIENT_ID: old_ca.issue(CLIENT_ID)})
    renewed, new_bundle = new_ca.issue(CLIENT_ID), new_ca.bundle
    credentials.replace(new_bundle, {CLIENT_ID: renewed})
    assert await credentials.credential(CLIENT_ID, 0.0) is renewed
    assert credentials.trust_bundle() is new_bundle
    credentials.replace(new_bundle, {})
    assert isinstance(await credentials.credential(CLIENT_ID, 0.0), CredentialUnavailable)
