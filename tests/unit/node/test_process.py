"""The node process captures exactly its own enrolled pods and notices when its files change."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from ipaddress import ip_address
from pathlib import Path

import yaml

from agent.identity.testing import EphemeralCa
from agent.node.config import load_static_config
from agent.node.process import files_state, local_pod_ips


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
