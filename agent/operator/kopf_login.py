"""How the agent's embedded kopf operators authenticate: with the same `ApiAccess` as its lean clients.

kopf would otherwise look for credentials on its own (kubeconfig, in-cluster mount, the kubernetes
client), which could pick different ones than the rest of the process.
"""

from __future__ import annotations

from typing import Any

import kopf

from agent.operator.kubeapi import ApiAccess


def register_login(registry: kopf.OperatorRegistry, access: ApiAccess) -> None:
    """Makes `registry`'s operator log in with `access`."""

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        # Called again on a 401, so a rotated token file is picked up.
        bearer = access.auth_headers().get("Authorization", "").removeprefix("Bearer ")
        return kopf.ConnectionInfo(
            server=access.server,
            ca_path=access.ca_file,
            token=bearer or None,
            certificate_path=access.cert_file,
            private_key_path=access.key_file,
        )
