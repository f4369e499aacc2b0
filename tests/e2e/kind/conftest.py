"""Fixtures of the kind scenarios: the cluster that tests/e2e/kind/run.sh (`make e2e-kind`) made.

Without `AMBIENT_KIND_KUBECONFIG` (set by run.sh) every test here is skipped with that reason, so
`make e2e` and `make test` pass over them on machines without Docker and kind.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.e2e.kind.backend import KindCluster


@pytest.fixture(scope="session")
def kind() -> KindCluster:
    kubeconfig = os.environ.get("AMBIENT_KIND_KUBECONFIG")
    if not kubeconfig:
        pytest.skip(
            "kind scenarios run through `make e2e-kind` (tests/e2e/kind/run.sh), which needs Docker and kind"
        )
    return KindCluster(Path(kubeconfig), os.environ.get("AMBIENT_KIND_IMAGE", "ambient-agent:e2e"))
