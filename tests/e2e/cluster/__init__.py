"""The local e2e cluster: a real control plane and namespace-based nodes with a Python kubelet.

`Cluster.up(Layout(...))` starts one; `python -m tests.e2e.cluster up|down|status --state-dir DIR`
drives it from a shell (the Makefile's cluster-up/cluster-down); tests get it from the `cluster`
fixture in tests/e2e/conftest.py.
"""

from __future__ import annotations

from tests.e2e.cluster.cluster import Cluster, ClusterError, CommandFailed, NodeHandle, PodHandle
from tests.e2e.cluster.layout import Layout, prefix_from_env

__all__ = ["Cluster", "ClusterError", "CommandFailed", "Layout", "NodeHandle", "PodHandle", "prefix_from_env"]
