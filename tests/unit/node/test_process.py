"""The node process captures exactly its own enrolled pods, notices when its files change, and counts
a configuration it cannot reload as a reconcile error."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from ipaddress import ip_address
from pathlib import Path

import pytest
import yaml

from agent.identity.testing import EphemeralCa
from agent.node.config import load_static_config
from agent.node.process import NodeProcess, files_state, local_pod_ips
from agent.node.settings import LogSettings, NodeProcessSettings, StaticConfigSettings
from agent.node.shared import LISTENERS_BOUND, REDIRECTION_RECONCILER
from agent.settings import NodeSettings
from tests.unit.node.running import (
    dataplane_settings,
    eventually,
    free_ports,
    no_nft_on_path,
    reconcile_errors,
    running,
)


def test_capture_covers_every_address_of_the_enrolled_pods_on_this_node_only(tmp_path: Path) -> None:
    (tmp_path / "bundle.pem").write_bytes(EphemeralCa.create().bundle.to_pem())
    node_ip = "10.99.0.11"
    workloads = [
        {
            "name": "dual",
            "ips": ["10.244.1.5", "fd00::5"],
            "node": "node-1",
            "nodeIP": node_ip,
            "enrolled": True,
        },
        {"name": "plain", "ip": "10.244.1.6", "node": "node-1", "nodeIP": node_ip, "enrolled": False},
        {"name": "elsewhere", "ip": "10.244.2.5", "node": "node-2", "nodeIP": "10.99.0.12", "enrolled": True},
    ]
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump({"trustBundle": "bundle.pem", "workloads": workloads}))
    config = load_static_config(path, version=1, now=datetime.now(UTC), hbone_port=15008)
    assert local_pod_ips(config, "node-1") == {ip_address("10.244.1.5"), ip_address("fd00::5")}
    assert local_pod_ips(config, "node-3") == frozenset()


def test_file_state_changes_when_a_file_is_rewritten_replaced_or_removed(tmp_path: Path) -> None:
    path = tmp_path / "cert.pem"
    path.write_text("one")
    first = files_state([path])
    assert files_state([path]) == first
    path.write_text("one, longer")
    rewritten = files_state([path])
    assert rewritten != first
    replacement = tmp_path / "cert.pem.new"
    replacement.write_text("one, longer")
    os.replace(replacement, path)
    assert files_state([path]) != rewritten
    path.unlink()
    assert files_state([path]) == {path: None}


@pytest.mark.skipif(os.geteuid() != 0, reason="the data plane's listeners need root (IP_TRANSPARENT)")
async def test_a_configuration_that_cannot_be_reloaded_counts_as_a_reconcile_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_nft_on_path(monkeypatch, tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    (tmp_path / "bundle.pem").write_bytes(EphemeralCa.create().bundle.to_pem())
    path = tmp_path / "mesh.yaml"
    workload = {"name": "web", "ip": "192.0.2.5", "node": "node-1", "nodeIP": "192.0.2.1", "enrolled": True}
    path.write_text(yaml.safe_dump({"trustBundle": "bundle.pem", "workloads": [workload]}))
    ports = free_ports()
    process = NodeProcess(
        NodeProcessSettings(
            node=NodeSettings(node_name="node-1", ports=ports),
            dataplane=dataplane_settings(ports),
            log=LogSettings(),
            static_config=StaticConfigSettings(path, poll_interval_s=0.05),
        ),
        load_static_config(path, version=1, now=datetime.now(UTC), hbone_port=ports.inbound_hbone),
    )
    async with running(process.run, ports):
        await eventually(lambda: LISTENERS_BOUND not in process.readiness.pending, "listeners bound")
        assert reconcile_errors(process.metrics, "static-config") == 0

        path.write_text("workloads: [")  # the change is noticed, the file no longer parses
        await eventually(
            lambda: reconcile_errors(process.metrics, "static-config") == 1, "the failed reload counted"
        )
        # The configuration in use stays, and capture never got past its first step on this machine.
        dump = process.config_dump()
        assert "192.0.2.5" in json.dumps(dump)
        assert "nft" in str(dump["redirect"]["last_error"])
        assert dump["redirect"]["synced_pods"] is None
        assert reconcile_errors(process.metrics, REDIRECTION_RECONCILER) >= 1
