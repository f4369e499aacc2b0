"""Fixtures of the end-to-end tests: one local cluster per session, removed even after failures.

Every test under tests/e2e is marked `e2e`. The `cluster` fixture skips (with the reason) when not
root (and fails when the control-plane binaries cannot be built); otherwise it builds them if needed (once,
cached), starts the cluster under the prefix `AMBIENT_E2E_PREFIX` (default "aae"), and tears it all
down at the end of the session. Component and pod logs stay in the state directory
(/run/ambient-agent/e2e-<prefix>) for diagnosis. Two sessions with the same prefix clobber each
other (each removes the other's "stale" cluster): give concurrent runs different prefixes.
`AMBIENT_E2E_ATTACH=<state dir>` runs the tests against an already running cluster instead.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.cluster import Cluster, Layout, prefix_from_env
from tests.e2e.cluster.controlplane import missing_binaries
from tests.e2e.cluster.layout import REPO_ROOT

_timings: dict[str, float] = {}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    e2e_dir = Path(__file__).parent
    for item in items:
        if e2e_dir in Path(item.path).parents:
            item.add_marker(pytest.mark.e2e)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for what, seconds in _timings.items():
        terminalreporter.write_line(f"e2e cluster: {what} {seconds:.1f}s")


def _ensure_control_plane() -> None:
    if not missing_binaries():
        return
    started = time.monotonic()
    build = subprocess.run(
        [str(REPO_ROOT / "scripts" / "build-control-plane.sh")], capture_output=True, text=True, check=False
    )
    if build.returncode != 0 or missing_binaries():
        tail = "\n".join(build.stderr.splitlines()[-8:])
        # As root the build is expected to work; a failure here must fail the run, never skip it.
        pytest.fail(f"the control-plane binaries cannot be built (scripts/build-control-plane.sh):\n{tail}")
    _timings["control-plane build (cold)"] = time.monotonic() - started


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The session's local cluster (see tests/e2e/cluster)."""
    if os.geteuid() != 0:
        pytest.skip("e2e tests need root: they create network namespaces and run a control plane")
    attach_to = os.environ.get("AMBIENT_E2E_ATTACH")
    if attach_to:
        # A cluster from `make cluster-up` (or `python -m tests.e2e.cluster up`): faster iteration;
        # it is left running.
        yield Cluster.attach(Path(attach_to))
        return
    _ensure_control_plane()
    prefix = prefix_from_env()
    layout = Layout(prefix=prefix, state_dir=Path("/run/ambient-agent") / f"e2e-{prefix}")
    started = time.monotonic()
    running = Cluster.up(layout)
    _timings["bring-up (warm)"] = time.monotonic() - started
    try:
        yield running
    finally:
        running.down(keep_logs=True)
