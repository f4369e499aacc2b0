"""The Helm chart's renderer for tests: scripts/render-manifests.py, loaded as a module.

It renders deploy/helm/ambient-agent with Helm's own engine; the same code writes
manifests/ambient-agent.yaml, so the tests check what `make manifests` produces.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[1]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "render_manifests", REPO_ROOT / "scripts" / "render-manifests.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


renderer = _load()
