"""SPIFFE IDs parse strictly, print back to the same text, and come out of certificates' URI SANs."""

from __future__ import annotations

import pytest
from cryptography import x509
from hypothesis import given
from hypothesis import strategies as st

from agent.identity.spiffe import InvalidSpiffeId, MissingUriSan, SpiffeId
from agent.identity.testing import EphemeralCa


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("spiffe://cluster.local/ns/default/sa/default", SpiffeId("cluster.local", "default", "default")),
        ("spiffe://td/ns/a/sa/b", SpiffeId("td", "a", "b")),
        (
            "spiffe://my_td-1.example/ns/kube-system/sa/x.y-z",
            SpiffeId("my_td-1.example", "kube-system", "x.y-z"),
        ),
        (
            f"spiffe://cluster.local/ns/{'n' * 63}/sa/{'s' * 253}",
            SpiffeId("cluster.local", "n" * 63, "s" * 253),
        ),
    ],
)
def test_valid_ids_parse_and_print_back(text: str, expected: SpiffeId) -> None:
    parsed = SpiffeId.parse(text)
    assert parsed == expected
    assert str(parsed) == text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "does not start with 'spiffe://'"),
        ("https://cluster.local/ns/a/sa/b", "does not start with 'spiffe://'"),
        ("SPIFFE://cluster.local/ns/a/sa/b", "does not start with 'spiffe://'"),
        ("spiffe:/cluster.local/ns/a/sa/b", "does not start with 'spiffe://'"),
        ("spiffe:///ns/a/sa/b", "trust domain is empty"),
        ("spiffe://Cluster.local/ns/a/sa/b", "may hold only lowercase letters"),
        ("spiffe://cluster.local:443/ns/a/sa/b", "may hold only lowercase letters"),
        ("spiffe://user@cluster.local/ns/a/sa/b", "may hold only lowercase letters"),
        (f"spiffe://{'t' * 256}/ns/a/sa/b", "longer than 255"),
        ("spiffe://cluster.local", "path must be exactly"),
        ("spiffe://cluster.local/", "path must be exactly"),
        ("spiffe://cluster.local/ns/a", "path must be exactly"),
        ("spiffe://cluster.local/ns/a/sa/b/", "path must be exactly"),
        ("spiffe://cluster.local//ns/a/sa/b", "path must be exactly"),
        ("spiffe://cluster.local/ns/a/sa/b/extra", "path must be exactly"),
        ("spiffe://cluster.local/sa/b/ns/a", "path must be exactly"),
        ("spiffe://cluster.local/ns//sa/b", "namespace is empty"),
        ("spiffe://cluster.local/ns/a/sa/", "service account is empty"),
        ("spiffe://cluster.local/ns/A/sa/b", "namespace 'A' is not a valid Kubernetes name"),
        ("spiffe://cluster.local/ns/a.b/sa/b", "namespace 'a.b' is not a valid Kubernetes name"),
        ("spiffe://cluster.local/ns/-a/sa/b", "namespace '-a' is not a valid Kubernetes name"),
        ("spiffe://cluster.local/ns/a/sa/b-", "service account 'b-' is not a valid Kubernetes name"),
        ("spiffe://cluster.local/ns/a/sa/b..c", "service account 'b..c' is not a valid Kubernetes name"),
        ("spiffe://cluster.local/ns/a/sa/%62", "service account '%62' is not a valid Kubernetes name"),
        ("spiffe://cluster.local/ns/a/sa/b?x=1", "service account 'b?x=1' is not a valid Kubernetes name"),
        ("spiffe://cluster.local/ns/a/sa/b#f", "service account 'b#f' is not a valid Kubernetes name"),
        ("spiffe://cluster.local/ns/a/sa/b\n", "is not a valid Kubernetes name"),
        ("spiffe://cluster.local/ns/./sa/b", "namespace '.' is not a valid Kubernetes name"),
        (f"spiffe://cluster.local/ns/{'n' * 64}/sa/b", "longer than 63 characters"),
        (f"spiffe://cluster.local/ns/a/sa/{'s' * 254}", "longer than 253 characters"),
        (f"spiffe://cluster.local/ns/a/sa/{'s' * 2100}", "longer than 2048 characters"),
    ],
)
def test_invalid_ids_are_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(InvalidSpiffeId) as refused:
        SpiffeId.parse(text)
    assert reason in str(refused.value)


_LABEL = r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?"


@given(
    trust_domain=st.from_regex(r"[a-z0-9._-]{1,40}", fullmatch=True),
    namespace=st.from_regex(_LABEL, fullmatch=True),
    service_account=st.from_regex(rf"{_LABEL}(\.{_LABEL}){{0,3}}", fullmatch=True),
)
def test_every_valid_id_round_trips_through_text(
    trust_domain: str, namespace: str, service_account: str
) -> None:
    spiffe_id = SpiffeId(trust_domain, namespace, service_account)
    assert SpiffeId.parse(str(spiffe_id)) == spiffe_id


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(InvalidSpiffeId, match="namespace 'Default' is not a valid Kubernetes name"):
        SpiffeId("cluster.local", "Default", "default")


def test_id_is_read_from_a_workload_certificate(ca: EphemeralCa) -> None:
    issued = ca.issue("spiffe://cluster.local/ns/shop/sa/cart")
    assert SpiffeId.from_certificate(issued.leaf) == SpiffeId("cluster.local", "shop", "cart")


@pytest.mark.parametrize(
    ("names", "error", "reason"),
    [
        ([], MissingUriSan, "certificate has no subject alternative names"),
        ([x509.DNSName("cart.shop")], MissingUriSan, "certificate has no URI subject alternative name"),
        (
            [
                x509.UniformResourceIdentifier("spiffe://cluster.local/ns/a/sa/b"),
                x509.UniformResourceIdentifier("spiffe://cluster.local/ns/a/sa/c"),
            ],
            InvalidSpiffeId,
            "certificate has 2 URI subject alternative names, not one",
        ),
        ([x509.UniformResourceIdentifier("spiffe://cluster.local")], InvalidSpiffeId, "path must be exactly"),
    ],
)
def test_certificates_without_exactly_one_workload_id_are_refused(
    ca: EphemeralCa, names: list[x509.GeneralName], error: type[InvalidSpiffeId], reason: str
) -> None:
    with pytest.raises(error) as refused:
        SpiffeId.from_certificate(ca.issue_malformed(names))
    assert reason in str(refused.value)
    assert type(refused.value) is error
