"""The shared end-to-end scenarios (tests/e2e/scenarios.py) on kind, against agents installed by the
Helm chart; the local suite runs the same ones (tests/e2e/test_install.py)."""

from __future__ import annotations

import pytest

from tests.e2e.kind.backend import KindCluster
from tests.e2e.scenarios import SCENARIOS, Scenario

MESH_NAMESPACE = "ambient-e2e"


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda scenario: scenario.__name__)
def test_scenario(kind: KindCluster, scenario: Scenario) -> None:
    scenario(kind, MESH_NAMESPACE)
