"""Istio's string wildcards and the policy values' derived properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.state.policy import (
    Action,
    AuthorizationPolicy,
    MatchKind,
    PolicyKind,
    PolicyRef,
    Rule,
    StringMatch,
)


@pytest.mark.parametrize(
    ("pattern", "kind", "value"),
    [
        ("*", MatchKind.PRESENCE, ""),
        ("*/sa/admin", MatchKind.SUFFIX, "/sa/admin"),
        ("cluster.local/ns/a/*", MatchKind.PREFIX, "cluster.local/ns/a/"),
        ("cluster.local/ns/a/sa/b", MatchKind.EXACT, "cluster.local/ns/a/sa/b"),
        ("a*b", MatchKind.EXACT, "a*b"),
        ("**", MatchKind.SUFFIX, "*"),
    ],
)
def test_wildcard_forms(pattern: str, kind: MatchKind, value: str) -> None:
    match = StringMatch.parse(pattern)

    assert (match.kind, match.value) == (kind, value)
    assert str(match) == pattern


@pytest.mark.parametrize(
    ("pattern", "candidate", "matches"),
    [
        ("*", "anything", True),
        ("*", "", False),
        ("*", None, False),
        ("prod-*", "prod-eu", True),
        ("prod-*", "dev-eu", False),
        ("*-eu", "prod-eu", True),
        ("*-eu", "prod-us", False),
        ("exact", "exact", True),
        ("exact", "exactly", False),
        ("exact", None, False),
        ("a*b", "axb", False),
    ],
)
def test_wildcard_matching(pattern: str, candidate: str | None, matches: bool) -> None:
    assert StringMatch.parse(pattern).matches(candidate) is matches


@given(st.text(st.characters(exclude_characters="*"), min_size=1), st.integers(min_value=0))
def test_every_value_matches_itself_any_own_prefix_and_suffix_and_presence(value: str, cut: int) -> None:
    cut %= len(value) + 1

    assert StringMatch.parse(value).matches(value)
    assert StringMatch.parse(f"{value[:cut]}*").matches(value)
    assert StringMatch.parse(f"*{value[cut:]}").matches(value)
    assert StringMatch.parse("*").matches(value)
    assert not StringMatch.parse(value).matches(value + "x")


def test_policy_ref_names_kind_namespace_and_name() -> None:
    policy = AuthorizationPolicy(namespace="shop", name="deny-all", action=Action.DENY)

    assert policy.ref == PolicyRef(PolicyKind.AUTHORIZATION_POLICY, "shop", "deny-all")
    assert str(policy.ref) == "AuthorizationPolicy shop/deny-all"


def test_policy_without_unsupported_fields_has_no_warning() -> None:
    policy = AuthorizationPolicy(namespace="shop", name="p", rules=(Rule(), Rule()))

    assert policy.unsupported_fields == ()
    assert policy.warning is None
