"""Shared fixtures: throwaway roots for the identity tests."""

from __future__ import annotations

import pytest

from agent.identity.testing import EphemeralCa


@pytest.fixture
def ca() -> EphemeralCa:
    """The trusted root of `cluster.local`."""
    return EphemeralCa.create()


@pytest.fixture
def other_ca() -> EphemeralCa:
    """A second, unrelated root for the same trust domain: trusted by nobody in these tests."""
    return EphemeralCa.create()
