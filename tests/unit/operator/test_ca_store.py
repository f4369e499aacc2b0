"""The CA's root round-trips through its Secret, a damaged Secret is refused (never replaced), and the
published bundle holds the current root plus the retired roots that are still valid."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agent.identity.ca import create_root
from agent.identity.certificates import CertificateError, TrustBundle, certificates_to_pem
from agent.operator.ca_store import (
    BUNDLE_KEY,
    RETIRED_ROOTS_KEY,
    ROOT_KEY_KEY,
    authority_from_secret,
    bundle_configmap,
    published_bundle,
    root_secret,
)

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def test_root_round_trips_through_its_secret() -> None:
    authority = create_root("cluster.local", now=NOW)
    secret = root_secret(authority, "ambient-system", "ambient-agent-ca")
    assert secret["metadata"] == {
        "name": "ambient-agent-ca",
        "namespace": "ambient-system",
        "labels": {"app.kubernetes.io/name": "ambient-agent", "app.kubernetes.io/component": "ca"},
    }
    loaded = authority_from_secret(secret)
    assert loaded.certificate == authority.certificate
    assert loaded.key_pem() == authority.key_pem()


def _damaged(change: str) -> dict[str, Any]:
    secret = root_secret(create_root("cluster.local", now=NOW), "ns", "ca")
    if change == "no key":
        del secret["data"][ROOT_KEY_KEY]
    elif change == "not base64":
        secret["data"][ROOT_KEY_KEY] = "***"
    elif change == "other key":
        other = create_root("cluster.local", now=NOW)
        secret["data"][ROOT_KEY_KEY] = base64.b64encode(other.key_pem()).decode()
    return secret


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("no key", "the Secret lacks root.crt or root.key"),
        ("not base64", "Secret key root.key: not base64"),
        ("other key", "CA: key does not match the root certificate"),
    ],
)
def test_damaged_secret_is_refused_saying_why(change: str, message: str) -> None:
    with pytest.raises(CertificateError, match=message):
        authority_from_secret(_damaged(change))


def test_bundle_keeps_still_valid_retired_roots_after_the_current_one() -> None:
    current = create_root("cluster.local", now=NOW)
    retired = create_root("cluster.local", now=NOW - timedelta(days=30))
    expired = create_root("cluster.local", now=NOW - timedelta(days=30), lifetime=timedelta(days=1))
    secret = root_secret(current, "ns", "ca")
    secret["data"][RETIRED_ROOTS_KEY] = base64.b64encode(
        certificates_to_pem((retired.certificate, expired.certificate, current.certificate))
    ).decode()
    bundle = published_bundle(secret, current, NOW)
    assert bundle.roots == (current.certificate, retired.certificate)


def test_bundle_without_retired_roots_is_the_current_root() -> None:
    current = create_root("cluster.local", now=NOW)
    bundle = published_bundle(root_secret(current, "ns", "ca"), current, NOW)
    assert bundle.roots == (current.certificate,)


def test_configmap_publishes_the_bundle_as_pem() -> None:
    current = create_root("cluster.local", now=NOW)
    bundle = TrustBundle((current.certificate,))
    configmap = bundle_configmap(bundle, "ambient-system", "ambient-agent-trust-bundle")
    assert configmap["metadata"]["name"] == "ambient-agent-trust-bundle"
    assert TrustBundle.from_pem(configmap["data"][BUNDLE_KEY]) == bundle
