"""Fixtures of the kind scenarios: the cluster that tests/e2e/kind/run.sh (`make e2e-kind`) made.

Without `AMBIENT_KIND_KUBECONFIG` (set by run.sh) every test here is skipped with that reason, so
`make e2e` and `make test` pass over them on machines without Docker and kind.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.kind.backend import KindCluster

MESH_NAMESPACE = "ambient-e2e"


@pytest.fixture(scope="session")
def kind() -> KindCluster:
    kubeconfig = os.environ.get("AMBIENT_KIND_KUBECONFIG")
    if not kubeconfig:
        pytest.skip(
            "kind scenarios run through `make e2e-kind` (tests/e2e/kind/run.sh), which needs Docker and kind"
        )
    return KindCluster(Path(kubeconfig), os.environ.get("AMBIENT_KIND_IMAGE", "ambient-agent:e2e"))


@pytest.fixture
def mesh_namespace(kind: KindCluster) -> Iterator[str]:
    """A namespace enrolled by its label, removed after the test."""
    kind.ensure_namespace(MESH_NAMESPACE, {"istio.io/dataplane-mode": "ambient"})
    yield MESH_NAMESPACE
    kind.delete_namespace(MESH_NAMESPACE)
    kind.wait_for(lambda: MESH_NAMESPACE not in kind.namespaces(), 120, f"namespace {MESH_NAMESPACE} gone")
