"""Access to the Kubernetes API server for the agent's own lean HTTP clients.

kopf and the official client bring their own connection handling; the cluster-wide discovery
watcher does not use them (FACTS.md: the official client costs ~3x the time and 2x the memory of
aiohttp + json for a large LIST). This module turns a kubeconfig or the in-cluster service-account
mount into what an aiohttp session needs: the server URL, a TLS context and the auth header.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path

IN_CLUSTER_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
"""Where Kubernetes mounts a pod's service-account token and the cluster CA."""


class ApiAccessError(RuntimeError):
    """The API server's address or credentials could not be loaded."""


@dataclass(frozen=True)
class ApiAccess:
    """How to reach and authenticate to the Kubernetes API server."""

    server: str
    """Base URL, e.g. `https://10.0.0.1:6443`, without a trailing slash."""

    ca_file: str | None = None
    """PEM bundle that verifies the server; None uses the system roots."""

    cert_file: str | None = None
    """Client certificate (PEM) for certificate authentication."""

    key_file: str | None = None
    """Key of `cert_file`."""

    token: str | None = None
    """A static bearer token (from a kubeconfig)."""

    token_file: str | None = None
    """A bearer-token file re-read on every request, so projected tokens rotate without restart."""

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context that verifies the server and presents the client certificate."""
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def auth_headers(self) -> dict[str, str]:
        """The `Authorization` header for the current token, if any."""
        token = self.token
        if self.token_file:
            token = Path(self.token_file).read_text().strip()
        return {"Authorization": f"Bearer {token}"} if token else {}


def load_api_access(kubeconfig: str | None = None) -> ApiAccess:
    """Loads API access from `kubeconfig`, else `$KUBECONFIG`, else the in-cluster mount."""
    path = kubeconfig or os.environ.get("KUBECONFIG")
    if path:
        return _from_kubeconfig(path)
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    if host and port and (IN_CLUSTER_DIR / "token").exists():
        if ":" in host:
            host = f"[{host}]"
        return ApiAccess(
            server=f"https://{host}:{port}",
            ca_file=str(IN_CLUSTER_DIR / "ca.crt"),
            token_file=str(IN_CLUSTER_DIR / "token"),
        )
    raise ApiAccessError(
        "no Kubernetes API access: pass --kubeconfig, set KUBECONFIG, or run in a pod with a"
        " service-account token"
    )


def _from_kubeconfig(path: str) -> ApiAccess:
    # The official client's loader handles contexts, inline data (written to temp files) and exec
    # plugins; reusing it keeps kubeconfig semantics identical to kubectl's.
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_kube_config(  # type: ignore[no-untyped-call]  # the client ships no stubs
            config_file=path, client_configuration=configuration
        )
    except Exception as error:  # the loader raises many unrelated types for one bad file
        raise ApiAccessError(f"cannot load kubeconfig {path}: {error}") from error
    api_key = configuration.api_key.get("authorization") or configuration.api_key.get("BearerToken")
    token = api_key.removeprefix("Bearer ").strip() if api_key else None
    return ApiAccess(
        server=configuration.host.rstrip("/"),
        ca_file=configuration.ssl_ca_cert,
        cert_file=configuration.cert_file,
        key_file=configuration.key_file,
        token=token or None,
    )
